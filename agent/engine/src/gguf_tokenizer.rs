//! Tokenizers built from a GGUF file's own metadata, as llama.cpp builds them:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE. Text is split by the regular expressions
//!   of the pre-tokenizer `tokenizer.ggml.pre` names, one after the other (each splits the pieces
//!   the previous one left, keeping matches and gaps), then merged by rank. [`PRE_TOKENIZERS`]
//!   lists every name llama.cpp maps to a rule that regular expressions express.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece BPE (Llama 2, Mistral, TinyLlama, Phi-3):
//!   spaces become `▁`, a space is put before the text and after every special token, pieces
//!   merge by the score of what they make, and characters the vocabulary lacks fall back to
//!   their UTF-8 bytes (`<0xNN>` tokens).
//!
//! Either way control and user-defined tokens are matched whole in text, unused ones are left out
//! of the vocabulary (they only pad it to the embedding's rows), and a BOS token is put first when
//! the file or the tokenizer's kind says so.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Contractions, as the case-insensitive group of Llama 3's and Qwen's expressions is written
/// for engines without inline flags.
const CONTRACTIONS: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";

/// GPT-2's word split.
const GPT2_WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// How a BPE pre-tokenizer splits text, and what else its name implies.
#[derive(Debug, Clone, Copy)]
pub struct PreTokenizer {
    /// The names `tokenizer.ggml.pre` gives it.
    pub names: &'static [&'static str],
    /// The expressions, applied one after the other (`{C}` stands for the contractions).
    pub splits: &'static [&'static str],
    /// Whether a word the vocabulary holds whole is taken whole, before any merge.
    pub ignore_merges: bool,
    /// Whether a BOS token goes first when the file does not say (`add_bos_token`).
    pub add_bos: bool,
}

/// Every pre-tokenizer name llama.cpp maps to a rule regular expressions express, with that rule.
/// Names it handles with code of its own (`kimi-k2`, `afmoe`, `superbpe`) or without byte-level
/// encoding (`gemma4`, `sarvam-moe`, `whitespace`) are not here and are refused by name.
pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &["default"],
        splits: &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_WORDS,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["dbrx", "smaug-bpe"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["chatglm-bpe"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["glm4", "glm5"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: false,
    },
    PreTokenizer {
        names: &["jais-2"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-llm"],
        splits: &[
            r"[\r\n]",
            "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
            "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
            r"\s+$",
            "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
            r"\p{N}+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        splits: &[
            r"\p{N}{1,3}",
            "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-coder"],
        splits: &[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
            r"\p{N}",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["falcon"],
        splits: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_WORDS, "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        splits: &[r"\p{N}", GPT2_WORDS],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        splits: &[GPT2_WORDS],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "megrez",
            "grok-2",
        ],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["qwen35"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["poro-chat", "bloom", "gpt3-finnish"],
        splits: &[" ?[^(\\s|.,!?\u{2026}\u{3002}\u{ff0c}\u{3001}\u{964}\u{6d4}\u{60c})]+"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["viking"],
        splits: &[
            " ?[^(\\s|.,!?\u{2026}\u{3002}\u{ff0c}\u{3001}\u{964}\u{6d4}\u{60c})]+",
            r"\p{N}",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["tekken"],
        splits: &[
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["chameleon"],
        splits: &[
            "<sentinel:[0-9]+>",
            "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            GPT2_WORDS,
        ],
        ignore_merges: false,
        add_bos: true,
    },
    PreTokenizer {
        names: &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        splits: &[
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+{C}?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*{C}?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["granite-embed-multi-97m"],
        splits: &[
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+{C}?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*{C}?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: false,
    },
    PreTokenizer {
        names: &["tiny_aya", "cohere2moe"],
        splits: &[
            r"\d{1,3}(?=(?:\d{3})*\b)",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{C}?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{C}?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["bailingmoe", "bailingmoe2", "llada-moe"],
        splits: &[
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["seed-coder"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["ufakzeka"],
        splits: &[
            r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["laguna"],
        splits: &[
            r"[^\n]+|[\n]+",
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["exaone-moe"],
        splits: &[
            r"{C}|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["minicpm5"],
        splits: &[
            r"\p{N}{1,3}",
            r"{C}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: false,
    },
    PreTokenizer {
        names: &["spark2_5"],
        splits: &[
            r"\p{N}{1,3}",
            "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
            r"\p{N}",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["youtu"],
        splits: &[
            "[\u{ac00}-\u{d7a3}\u{3131}-\u{318e}]+|[\u{ff01}\u{2026}\u{201c}\u{201d}\u{2018}\u{2019}\u{2014}\u{ff1a}\u{ff1b}\u{ff0c}\u{3001}-\u{303f}\u{fe30}-\u{fe4f}]+|[\u{3105}-\u{312f}]+|[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{C}?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{C}?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        ignore_merges: true,
        add_bos: false,
    },
];

/// Names llama.cpp knows but splits with code of its own or without byte-level encoding.
const NEEDS_LLAMA_CPP: &[&str] = &[
    "kimi-k2",
    "afmoe",
    "superbpe",
    "gemma4",
    "granite-embed-multi-311m",
    "sarvam-moe",
    "whitespace",
];

/// The rule for a pre-tokenizer name (an absent name is llama.cpp's `default`).
pub fn pre_tokenizer(name: &str) -> Option<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name))
}

/// Builds the tokenizer `file`'s metadata describes.
pub fn from_gguf(file: &GgufFile) -> Result<TextTokenizer> {
    let meta = Meta { file };
    let kind = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
        meta.err(
            "tokenizer.ggml.model",
            "missing: the file carries no tokenizer".into(),
        )
    })?;
    if !["gpt2", "llama"].contains(&kind.as_str()) {
        return Err(meta.err(
            "tokenizer.ggml.model",
            format!(
                "{kind:?} is not supported; supported: gpt2 (byte-level BPE) and llama (SentencePiece); put the model's tokenizer.json beside the file"
            ),
        ));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = meta.types(tokens.len())?;
    let (mut tokenizer, default_bos) = if kind == "gpt2" {
        byte_level_bpe(&meta, &tokens, &types)?
    } else {
        sentencepiece(&meta, &tokens, &types)?
    };
    // Control and user-defined tokens are matched whole in text, as special tokens.
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .map(|(id, _)| AddedToken::from(tokens[id].clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| meta.err("tokenizer.ggml.token_type", e.to_string()))?;
    let add_bos = match meta.file.metadata("tokenizer.ggml.add_bos_token") {
        Some(v) => v
            .to_bool()
            .map_err(|_| meta.err("tokenizer.ggml.add_bos_token", "expected a bool".into()))?,
        None => default_bos,
    };
    let bos = meta.index("tokenizer.ggml.bos_token_id", tokens.len())?;
    match (add_bos, bos) {
        (true, Some(id)) => {
            let text = tokens[id].clone();
            let template = TemplateProcessing::builder()
                .try_single(format!("{text} $A"))
                .and_then(|b| b.try_pair(format!("{text} $A {text} $B")))
                .map_err(|e| meta.err("tokenizer.ggml.bos_token_id", e.to_string()))?
                .special_tokens(vec![(text, id as u32)])
                .build()
                .map_err(|e| meta.err("tokenizer.ggml.bos_token_id", e.to_string()))?;
            tokenizer.with_post_processor(Some(template));
        }
        (true, None) => {
            return Err(meta.err(
                "tokenizer.ggml.bos_token_id",
                "missing, though a BOS token is to be added".into(),
            ));
        }
        (false, _) if kind == "gpt2" => {
            tokenizer.with_post_processor(Some(ByteLevel::new(false, true, false)));
        }
        (false, _) => {}
    }
    Ok(TextTokenizer::from_tokenizer(tokenizer))
}

/// The GPT-2-style tokenizer of Llama 3, Qwen, SmolLM and most BPE models: the vocabulary
/// (without unused tokens), merges, and the pre-tokenizer named by `tokenizer.ggml.pre`. Also
/// whether its kind puts a BOS token first by default.
fn byte_level_bpe(meta: &Meta, tokens: &[String], types: &[i32]) -> Result<(Tokenizer, bool)> {
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(meta.err(
                "tokenizer.ggml.merges",
                format!("merge {m:?} is not two tokens"),
            )),
        })
        .collect::<Result<_>>()?;
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        if types[id] != UNUSED {
            vocab.insert(token.clone(), id as u32);
        }
    }
    for (a, b) in &merges {
        for part in [a, b] {
            if !vocab.contains_key(part) {
                return Err(meta.err(
                    "tokenizer.ggml.merges",
                    format!("merge \"{a} {b}\" names {part:?}, which is not a token"),
                ));
            }
        }
    }
    let name = meta
        .string("tokenizer.ggml.pre")?
        .unwrap_or_else(|| "default".into());
    let rule = pre_tokenizer(&name).ok_or_else(|| {
        let why = if NEEDS_LLAMA_CPP.contains(&name.as_str()) {
            "llama.cpp splits it with code of its own, which is not reproduced here"
        } else {
            "it is not a pre-tokenizer llama.cpp knows"
        };
        let known: Vec<&str> = PRE_TOKENIZERS
            .iter()
            .flat_map(|p| p.names.iter().copied())
            .collect();
        meta.err(
            "tokenizer.ggml.pre",
            format!(
                "{name:?} is not supported ({why}); supported: {}",
                known.join(", ")
            ),
        )
    })?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(rule.ignore_merges)
        .build()
        .map_err(|e| meta.err("tokenizer.ggml.tokens", e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(rule.splits.len() + 1);
    for split in rule.splits {
        let pattern = split.replace("{C}", CONTRACTIONS);
        steps.push(
            Split::new(
                SplitPattern::Regex(pattern),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| meta.err("tokenizer.ggml.pre", format!("{name}: {e}")))?
            .into(),
        );
    }
    steps.push(ByteLevel::new(false, false, false).into());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    Ok((tokenizer, rule.add_bos))
}

/// The SentencePiece tokenizer of Llama 2, Mistral and Phi-3: merges follow the scores of the
/// pieces they make; a space goes before the text and after every special token, as llama.cpp
/// puts it (`tokenizer.ggml.add_space_prefix`, default yes); characters the vocabulary lacks
/// become their bytes. A BOS token goes first by default.
fn sentencepiece(meta: &Meta, tokens: &[String], types: &[i32]) -> Result<(Tokenizer, bool)> {
    let scores = meta.floats("tokenizer.ggml.scores", tokens.len())?;
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        if types[id] != UNUSED {
            vocab.insert(token.clone(), id as u32);
        }
    }
    let merges = merges_from_scores(tokens, types, &scores, &vocab);
    let unk = meta
        .index("tokenizer.ggml.unknown_token_id", tokens.len())?
        .map(|id| tokens[id].clone())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| meta.err("tokenizer.ggml.tokens", e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space_prefix = match meta.file.metadata("tokenizer.ggml.add_space_prefix") {
        Some(v) => v
            .to_bool()
            .map_err(|_| meta.err("tokenizer.ggml.add_space_prefix", "expected a bool".into()))?,
        None => true,
    };
    let escape =
        Replace::new(" ", "▁").map_err(|e| meta.err("tokenizer.ggml.model", e.to_string()))?;
    // Normalizing each piece of text between special tokens, as llama.cpp does: the space goes
    // before every such piece, whatever it starts with.
    let normalizer: NormalizerWrapper = if space_prefix {
        tokenizers::normalizers::Sequence::new(vec![Prepend::new("▁".into()).into(), escape.into()])
            .into()
    } else {
        escape.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| meta.err("tokenizer.ggml.model", e.to_string()))?;
    let unescape =
        Replace::new("▁", " ").map_err(|e| meta.err("tokenizer.ggml.model", e.to_string()))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        unescape.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok((tokenizer, true))
}

/// SentencePiece BPE as merges: every way a piece splits into two pieces of the vocabulary is a
/// merge, ranked by the score of the piece it makes (highest first: SentencePiece merges the
/// pair whose result scores best), ties by the two parts' ids. Control, unused and byte tokens
/// are never made by merging.
fn merges_from_scores(
    tokens: &[String],
    types: &[i32],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    const NORMAL: i32 = 1;
    let mut ranked: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != NORMAL && types[id] != USER_DEFINED {
            continue;
        }
        let cuts = piece.char_indices().map(|(i, _)| i).skip(1);
        for cut in cuts {
            let (left, right) = piece.split_at(cut);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((scores[id], l, r, left.to_string(), right.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

/// Reading a file's tokenizer metadata, with errors that name the key.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl Meta<'_> {
    fn err(&self, key: &str, message: String) -> EngineError {
        EngineError::config(self.file.path(), key, message)
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.file.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .cloned()
                .map(Some)
                .map_err(|_| self.err(key, "expected a string".into())),
        }
    }

    fn list(&self, key: &str) -> Result<&Vec<candle_core::quantized::gguf_file::Value>> {
        self.file
            .metadata(key)
            .ok_or_else(|| self.err(key, "missing".into()))?
            .to_vec()
            .map_err(|_| self.err(key, "expected a list".into()))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.list(key)?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.err(key, "expected a list of strings".into()))
            })
            .collect()
    }

    fn floats(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let list = self.list(key)?;
        if list.len() != len {
            return Err(self.err(key, format!("{} scores for {len} tokens", list.len())));
        }
        list.iter()
            .map(|v| {
                v.to_f32()
                    .map_err(|_| self.err(key, "expected a list of numbers".into()))
            })
            .collect()
    }

    /// Token types, normal (1) for every token when the file has none.
    fn types(&self, len: usize) -> Result<Vec<i32>> {
        let key = "tokenizer.ggml.token_type";
        if self.file.metadata(key).is_none() {
            return Ok(vec![1; len]);
        }
        let list = self.list(key)?;
        if list.len() != len {
            return Err(self.err(key, format!("{} types for {len} tokens", list.len())));
        }
        list.iter()
            .map(|t| {
                t.to_i32()
                    .map_err(|_| self.err(key, "expected a list of integers".into()))
            })
            .collect()
    }

    /// A token id, checked against the `len` tokens.
    fn index(&self, key: &str, len: usize) -> Result<Option<usize>> {
        let Some(v) = self.file.metadata(key) else {
            return Ok(None);
        };
        let id = v
            .to_u32()
            .map(|n| n as usize)
            .or_else(|_| v.to_u64().map(|n| n as usize))
            .or_else(|_| v.to_i32().map(|n| n.max(-1) as isize as usize))
            .map_err(|_| self.err(key, format!("expected a token id, got {v:?}")))?;
        if id >= len {
            return Err(self.err(key, format!("{id} is past the {len} tokens")));
        }
        Ok(Some(id))
    }
}

/// The token ids llama.cpp ends generation at: `tokenizer.ggml.eos_token_id`, the end-of-turn,
/// end-of-message and fill-in-the-middle ids the file names, and every token whose text is one
/// of the chat formats' ends (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>` ...), whatever the
/// file marks it as.
pub fn end_of_generation(file: &GgufFile) -> Result<Vec<u32>> {
    const ENDS: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
    ];
    let meta = Meta { file };
    let Ok(tokens) = meta.strings("tokenizer.ggml.tokens") else {
        return Ok(Vec::new());
    };
    let mut ids: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
        "tokenizer.ggml.fim_pad_token_id",
        "tokenizer.ggml.fim_rep_token_id",
        "tokenizer.ggml.fim_sep_token_id",
    ] {
        if let Some(id) = meta.index(key, tokens.len())? {
            ids.push(id as u32);
        }
    }
    for (id, text) in tokens.iter().enumerate() {
        if ENDS.contains(&text.as_str()) && !ids.contains(&(id as u32)) {
            ids.push(id as u32);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pre_tokenizer_in_the_table_compiles_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for rule in PRE_TOKENIZERS {
            for name in rule.names {
                assert!(seen.insert(*name), "{name} is listed twice");
                assert!(!NEEDS_LLAMA_CPP.contains(name));
            }
            for split in rule.splits {
                let pattern = split.replace("{C}", CONTRACTIONS);
                Split::new(
                    SplitPattern::Regex(pattern.clone()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{:?}: {pattern}: {e}", rule.names));
            }
        }
        assert!(seen.len() >= 84, "{} names", seen.len());
    }
}
