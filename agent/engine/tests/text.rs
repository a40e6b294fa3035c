//! Text in and out on the files real models carry: the Qwen tokenizer and the chat templates of
//! real models from `../shared/data`, beside the project's own trained fixture tokenizer.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use cluster_engine::chat::ChatTemplate;
use cluster_engine::folder::TokenizerConfig;
use cluster_engine::tokenizer::{IncrementalDecoder, TextTokenizer};
use cluster_engine::{GenerateOptions, LocalPipeline, ModelFolder};
use cluster_fixtures::TinyModel;
use cluster_fixtures::shared_data;
use common::load_pipeline;
use serde_json::{Value, json};

const MIXED_TEXT: &str = "Crème brûlée in 東京 costs ¥1200 😀🚀 — naïve façade, Straße. Ω≈π.";

/// Streams `ids` through the incremental decoder, checking no piece breaks a character.
fn stream(tokenizer: &TextTokenizer, ids: &[u32]) -> String {
    let mut decoder = IncrementalDecoder::new(false);
    let mut out = String::new();
    for &id in ids {
        if let Some(piece) = decoder.push(tokenizer, id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} holds half a character"
            );
            out.push_str(&piece);
        }
    }
    if let Some(rest) = decoder.finish(tokenizer).unwrap() {
        out.push_str(&rest);
    }
    out
}

#[test]
fn qwen_tokenizer_encodes_as_qwen_and_streams_whole_characters() {
    let Some(data) = shared_data() else { return };
    let tokenizer = TextTokenizer::from_file(&data.join("qwen-tokenizer/tokenizer.json")).unwrap();
    assert_eq!(
        tokenizer.encode("Hello world", false).unwrap(),
        vec![9707, 1879]
    );
    assert_eq!(tokenizer.token_id("<|im_end|>"), Some(151645));
    let ids = tokenizer.encode(MIXED_TEXT, false).unwrap();
    // Byte-level BPE splits some of these characters over several tokens.
    let single = ids
        .iter()
        .filter(|&&id| tokenizer.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(
        single > 0,
        "the text should contain characters split across tokens"
    );
    assert_eq!(stream(&tokenizer, &ids), MIXED_TEXT);
    // A sequence that ends inside a character shows the rest as the replacement character
    // rather than dropping it: the text cut after the first token that ends mid-character.
    let cut = (1..ids.len())
        .map(|k| &ids[..k])
        .find(|c| tokenizer.decode(c, false).unwrap().ends_with('\u{FFFD}'))
        .unwrap();
    let whole = tokenizer.decode(cut, false).unwrap();
    let mut decoder = IncrementalDecoder::new(false);
    let mut streamed = String::new();
    for &id in cut {
        streamed.extend(decoder.push(&tokenizer, id).unwrap());
    }
    assert!(!streamed.contains('\u{FFFD}'), "{streamed:?}");
    let rest = decoder.finish(&tokenizer).unwrap().unwrap();
    assert!(rest.ends_with('\u{FFFD}'), "{rest:?}");
    assert_eq!(streamed + &rest, whole);
    assert_eq!(decoder.finish(&tokenizer).unwrap(), None);
}

/// A prompt far past the context is refused after counting a few pieces of it, and text within
/// it gets exactly the ids a whole encoding gives, whether or not it was counted first.
#[test]
fn a_prompt_past_the_context_is_counted_in_pieces_not_tokenized_whole() {
    let Some(data) = shared_data() else { return };
    let tokenizer = TextTokenizer::from_file(&data.join("qwen-tokenizer/tokenizer.json")).unwrap();
    let prose = format!("{MIXED_TEXT} The two machines sat side by side on the shelf.\n");
    // 4 MB: tokenized whole it would take hundreds of megabytes.
    let huge = prose.repeat(4_000_000 / prose.len());
    let limit = 40_960;
    let counted = tokenizer.encode_within(&huge, true, limit).unwrap();
    let Err(n) = counted else {
        panic!("a 4 MB prompt fits {limit} tokens")
    };
    // Refused once the count passed the limit, a piece of text later: not after tokenizing
    // all of it, which would count about a million tokens.
    assert!(n > limit && n < 2 * limit, "{n}");
    // Longer than the limit in bytes, within it in tokens: counted, then the same ids as whole.
    for text in [prose.repeat(3000), prose.repeat(40), " ".repeat(70_000)] {
        let want = tokenizer.encode(&text, true).unwrap();
        for limit in [want.len(), want.len() + 1, text.len() - 1] {
            let got = tokenizer.encode_within(&text, true, limit).unwrap();
            assert_eq!(
                got.as_ref().ok(),
                Some(&want),
                "{} bytes, limit {limit}",
                text.len()
            );
        }
        let got = tokenizer
            .encode_within(&text, true, want.len() - 1)
            .unwrap();
        assert!(got.is_err_and(|n| n >= want.len()), "{} bytes", text.len());
    }
}

#[test]
fn fixture_tokenizer_is_a_trained_byte_level_bpe() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::qwen3().write(dir.path()).unwrap();
    let tokenizer = TextTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    // Merges learnt from the corpus make common words single tokens.
    let ids = tokenizer.encode("the machines", false).unwrap();
    assert!(ids.len() * 2 <= "the machines".len(), "{ids:?}");
    let ids = tokenizer.encode(MIXED_TEXT, false).unwrap();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), MIXED_TEXT);
    assert_eq!(stream(&tokenizer, &ids), MIXED_TEXT);
    // Llama-style fixtures add a BOS through the post-processor.
    let dir = tempfile::tempdir().unwrap();
    TinyModel::llama().write(dir.path()).unwrap();
    let tokenizer = TextTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let bos = tokenizer.token_id("<|begin_of_text|>").unwrap();
    assert_eq!(tokenizer.encode("hi", true).unwrap()[0], bos);
    assert_ne!(tokenizer.encode("hi", false).unwrap()[0], bos);
}

#[test]
fn qwen3_template_renders_as_transformers_does() {
    let Some(data) = shared_data() else { return };
    let cfg = TokenizerConfig::read(&data.join("qwen-tokenizer")).unwrap();
    assert_eq!(cfg.eos_token.as_deref(), Some("<|im_end|>"));
    let template =
        ChatTemplate::new(cfg.chat_template.as_deref().unwrap(), "", "<|im_end|>").unwrap();
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
        {"role": "user", "content": "What is 2+2?"}
    ]);
    let text = template.render(&messages, true, None).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let extra = json!({"enable_thinking": false});
    let text = template.render(&messages, true, extra.as_object()).unwrap();
    assert!(
        text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{text}"
    );
}

/// Conversations every template is rendered with; some templates refuse some of them (a
/// system message, a leading assistant), and then the reference must refuse them too.
fn conversations() -> Vec<(Value, Value)> {
    let weather_tool = json!({"type": "function", "function": {"name": "get_weather",
        "description": "Weather <now> in a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "description": "e.g. Zürich"}}, "required": ["city"]}}});
    vec![
        (json!([{"role": "user", "content": "Hello"}]), json!({})),
        (
            json!([
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2? Ünïcødé 東京 😀"}
            ]),
            json!({}),
        ),
        (
            json!([{"role": "user", "content": "Weather in Paris?"}]),
            json!({"tools": [weather_tool]}),
        ),
        (
            json!([{"role": "assistant", "content": "I start."}, {"role": "assistant", "content": "Twice."}]),
            json!({}),
        ),
    ]
}

struct Reference {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Reference {
    fn start() -> Option<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/tools/render_chat.py");
        let has_jinja = Command::new("python3")
            .args(["-c", "import jinja2"])
            .status()
            .is_ok_and(|s| s.success());
        if !has_jinja {
            cluster_fixtures::skip("python3 with jinja2 not found (pip install jinja2)");
            return None;
        }
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Some(Self { child, out })
    }

    fn render(&mut self, request: &Value) -> Value {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{request}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

#[test]
fn real_chat_templates_render_as_the_jinja2_reference() {
    let Some(data) = shared_data() else { return };
    let Some(mut reference) = Reference::start() else {
        return;
    };
    let mut compared = 0;
    let mut entries: Vec<_> = std::fs::read_dir(data.join("chat-templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(entries.len() >= 8, "{entries:?}");
    for path in entries {
        let source = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let template = ChatTemplate::new(&source, "<s>", "</s>")
            .unwrap_or_else(|e| panic!("{name}: does not compile: {e}"));
        for (messages, extra) in conversations() {
            for add_generation_prompt in [true, false] {
                let expected = reference.render(&json!({
                    "template": source, "messages": messages, "extra": extra,
                    "add_generation_prompt": add_generation_prompt, "bos_token": "<s>", "eos_token": "</s>",
                }));
                let ours = template.render(&messages, add_generation_prompt, extra.as_object());
                match (&expected["text"], ours) {
                    (Value::String(want), Ok(got)) => {
                        // Templates that print today's date agree only up to the date itself.
                        if !want.contains("Today Date") {
                            assert_eq!(&got, want, "{name}: {messages}");
                        }
                        compared += 1;
                    }
                    (Value::String(want), Err(e)) => {
                        panic!("{name}: reference renders {want:?} but we fail: {e}")
                    }
                    (_, Err(e)) => {
                        let want = expected["error"].as_str().unwrap();
                        assert!(
                            e.to_string().contains(want),
                            "{name}: error {e} should contain {want:?}"
                        );
                    }
                    (_, Ok(got)) => panic!(
                        "{name}: reference fails ({}) but we render {got:?}",
                        expected["error"]
                    ),
                }
            }
        }
    }
    assert!(compared >= 40, "only {compared} renderings compared");
}

#[test]
fn a_qwen3_shaped_model_with_the_real_tokenizer_chats_end_to_end() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    TinyModel {
        hidden: 32,
        intermediate: 64,
        head_dim: 16,
        layers: 2,
        vocab_padding: 0,
        tokenizer_from: Some(data.join("qwen-tokenizer")),
        ..TinyModel::qwen3()
    }
    .write(dir.path())
    .unwrap();
    // Pad the vocabulary to Qwen3's 151936 rows, as the published checkpoint does.
    let folder = ModelFolder::open(dir.path()).unwrap();
    assert!(
        folder.config.vocab_size >= 151_669,
        "{}",
        folder.config.vocab_size
    );
    assert!(folder.eos_token_ids.contains(&151_645));
    let pipeline = load_pipeline(dir.path(), Some("0-0,1-1")).unwrap();
    let ids = pipeline
        .encode_chat(&json!([{"role": "user", "content": "Hello"}]))
        .unwrap();
    assert_eq!(
        pipeline.folder.tokenizer.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    let generated = twelve_tokens_stream_as_their_text(&pipeline, &ids);
    assert!(
        generated
            .iter()
            .all(|&t| (t as usize) < pipeline.folder.tokenizer.vocab_size())
    );
}

/// Generates twelve tokens after `ids` (whatever they are) and checks that the pieces
/// streamed add up to the generation's text; returns the tokens.
fn twelve_tokens_stream_as_their_text(pipeline: &LocalPipeline, ids: &[u32]) -> Vec<u32> {
    let mut streamed = String::new();
    let options = GenerateOptions {
        max_tokens: 12,
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let g = pipeline
        .generate(1, ids, &options, &mut |p| streamed.push_str(p))
        .unwrap();
    assert_eq!(g.token_ids.len(), 12);
    assert_eq!(streamed, g.text);
    g.token_ids
}

#[test]
fn a_phi3_shaped_model_with_the_published_phi_3_5_template_chats_end_to_end() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    TinyModel::phi3().write(dir.path()).unwrap();
    // Phi-3.5-mini-instruct's own template in place of the fixture's.
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(
        std::fs::read_to_string(data.join("chat-templates/microsoft-Phi-3.5-mini-instruct.jinja"))
            .unwrap()
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let pipeline = load_pipeline(dir.path(), Some("0-1,2-3")).unwrap();
    let ids = pipeline
        .encode_chat(&json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ]))
        .unwrap();
    let tokenizer = &pipeline.folder.tokenizer;
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
    );
    // The role markers are single tokens, as in the published tokenizer.
    let end = match tokenizer.encode("<|end|>", false).unwrap()[..] {
        [id] => id,
        ref other => panic!("<|end|> is {other:?}"),
    };
    assert_eq!(ids.iter().filter(|&&t| t == end).count(), 2, "{ids:?}");
    assert!(pipeline.folder.eos_token_ids.contains(&end));
    twelve_tokens_stream_as_their_text(&pipeline, &ids);
}
