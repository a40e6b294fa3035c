//! Tokenizers built from a GGUF file's own metadata encode exactly as the `tokenizer.json` they
//! were made from: the project's trained fixtures (GPT-2 pre-tokenizer, with and without BOS)
//! and the real Qwen tokenizer (Qwen2's pre-tokenizer).

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use cluster_engine::ModelFolder;
use cluster_engine::gguf::GgufFile;
use cluster_engine::tokenizer::TextTokenizer;
use cluster_fixtures::shared_data;
use cluster_fixtures::{TinyModel, tokenizer_metadata};

const SAMPLES: [&str; 8] = [
    "Hello world",
    "The two machines sat side by side on the shelf, joined by a short cable.",
    "Crème brûlée in 東京 costs ¥1200 😀🚀 — naïve façade, Straße.",
    "I'm sure they'll say it's fine; we've done 12345 of these, haven't we?",
    "fn main() {\n    println!(\"{}\", 42);\n}\n\n\n   trailing   spaces   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and\ttabs\r\nand CRLF",
    "numbers 3.14159 and 1,000,000 and 2026-11-30",
];

fn assert_same(ours: &TextTokenizer, reference: &TextTokenizer, what: &str) {
    for text in SAMPLES {
        for special in [false, true] {
            let a = ours.encode(text, special).unwrap();
            let b = reference.encode(text, special).unwrap();
            assert_eq!(a, b, "{what}: {text:?} (special tokens: {special})");
            assert_eq!(
                ours.decode(&a, false).unwrap(),
                reference.decode(&b, false).unwrap()
            );
        }
    }
}

#[test]
fn fixture_tokenizers_round_trip_through_gguf_metadata() {
    for model in [TinyModel::qwen3(), TinyModel::llama()] {
        let dir = tempfile::tempdir().unwrap();
        let gguf = model.write_gguf(dir.path(), GgmlDType::Q8_0).unwrap();
        let reference = TextTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
        let from_metadata = GgufFile::open(&gguf).unwrap().tokenizer().unwrap();
        assert_same(&from_metadata, &reference, &format!("{:?}", model.arch));
        // With no tokenizer.json beside it, the file alone is a usable model folder.
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let folder = ModelFolder::open(&gguf).unwrap();
        assert_same(&folder.tokenizer, &reference, "folder");
        assert!(
            folder.chat_template.is_some(),
            "the chat template comes from the file"
        );
        assert!(!folder.eos_token_ids.is_empty());
    }
}

#[test]
fn the_qwen_tokenizer_round_trips_through_gguf_metadata() {
    let Some(data) = shared_data() else { return };
    let json = data.join("qwen-tokenizer/tokenizer.json");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen-vocab.gguf");
    let mut metadata = tokenizer_metadata(&json, "qwen2", None).unwrap();
    metadata.push(("general.architecture".into(), Value::String("qwen2".into())));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t = QTensor::quantize(
        &Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let ours = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    let reference = TextTokenizer::from_file(&json).unwrap();
    assert_eq!(ours.vocab_size(), reference.vocab_size());
    assert_eq!(ours.encode("Hello world", false).unwrap(), vec![9707, 1879]);
    assert_same(&ours, &reference, "Qwen");
}

#[test]
fn unsupported_tokenizer_kinds_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    let md = [
        ("general.architecture", &Value::String("llama".into())),
        ("tokenizer.ggml.model", &Value::String("llama".into())),
    ];
    let t = QTensor::quantize(
        &Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let err = GgufFile::open(&path)
        .unwrap()
        .tokenizer()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("\"llama\" is not supported"),
        "{err}"
    );
}
