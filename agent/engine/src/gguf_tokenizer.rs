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

mod pre;

use self::pre::{CONTRACTIONS, NEEDS_LLAMA_CPP};
pub use self::pre::{PRE_TOKENIZERS, PreTokenizer, pre_tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

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
