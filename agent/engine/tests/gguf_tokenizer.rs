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
use cluster_engine::tokenizer::{IncrementalDecoder, TextTokenizer};
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

/// The error a GGUF file with `metadata` (and one tensor) gets for its tokenizer.
fn tokenizer_error(metadata: &[(&str, Value)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let t = QTensor::quantize(
        &Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    GgufFile::open(&path)
        .unwrap()
        .tokenizer()
        .err()
        .expect("refused")
        .to_string()
}

#[test]
fn unsupported_or_broken_tokenizers_are_refused_naming_the_field_and_value() {
    let s = |v: &str| Value::String(v.into());
    let list = |v: &[&str]| Value::Array(v.iter().map(|t| Value::String(t.to_string())).collect());
    let bpe = |pre: &str, merges: &[&str]| {
        vec![
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s(pre)),
            ("tokenizer.ggml.tokens", list(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", list(merges)),
        ]
    };
    for (what, metadata, needles) in [
        (
            "an unknown kind",
            vec![("tokenizer.ggml.model", s("rwkv"))],
            vec!["tokenizer.ggml.model", "\"rwkv\" is not supported"],
        ),
        (
            "an unknown pre-tokenizer",
            bpe("made-up", &["a b"]),
            vec![
                "tokenizer.ggml.pre",
                "\"made-up\" is not supported (it is not a pre-tokenizer llama.cpp knows)",
                "smollm",
            ],
        ),
        (
            "a pre-tokenizer llama.cpp codes by hand",
            bpe("kimi-k2", &["a b"]),
            vec!["\"kimi-k2\" is not supported (llama.cpp splits it with code of its own"],
        ),
        (
            "a merge of a missing token",
            bpe("smollm", &["a c"]),
            vec![
                "tokenizer.ggml.merges",
                "merge \"a c\" names \"c\", which is not a token",
            ],
        ),
        (
            "SentencePiece without scores",
            vec![
                ("tokenizer.ggml.model", s("llama")),
                ("tokenizer.ggml.tokens", list(&["a"])),
            ],
            vec!["tokenizer.ggml.scores", "missing"],
        ),
    ] {
        let err = tokenizer_error(&metadata);
        for needle in needles {
            assert!(err.contains(needle), "{what}: {needle:?} missing in: {err}");
        }
    }
}

/// llama.cpp's own tokenizer test files (`ggml-vocab-*.gguf` with `.inp` strings and `.out`
/// ids), from the llama-cpp-python sdist on PyPI, fetched once (sha256 checked) into the target
/// directory by `tests/tools/llamacpp_vocab.py`. `None`, loudly, where PyPI cannot be reached;
/// under `CI=true` that fails the test instead.
fn llamacpp_vocab() -> Option<std::path::PathBuf> {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("llamacpp-vocab-0.3.36");
    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/tools/llamacpp_vocab.py");
    let out = std::process::Command::new("python3")
        .arg(&tool)
        .arg(&cache)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(cache),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            cluster_fixtures::skip(&format!(
                "llama.cpp's tokenizer test files could not be fetched: {why}"
            ));
            None
        }
    }
}

/// A `.inp` file's test strings and the `.out` file's ids for each.
fn vectors(gguf: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", gguf.display())).unwrap();
    let inputs: Vec<String> = read("inp")
        .split("\n__ggml_vocab_test__\n")
        .map(str::to_string)
        .collect();
    let outputs: Vec<Vec<u32>> = read("out")
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // The last string ends with the separator's line, not a newline.
    let inputs: Vec<String> = inputs
        .into_iter()
        .map(|s| {
            s.strip_suffix("\n__ggml_vocab_test__")
                .map(str::to_string)
                .unwrap_or(s)
        })
        .collect();
    inputs.into_iter().zip(outputs).collect()
}

#[test]
fn gguf_tokenizers_encode_llama_cpps_test_strings_to_its_ids() {
    let Some(dir) = llamacpp_vocab() else { return };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| p.with_extension("gguf.inp").is_file())
        .collect();
    files.sort();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for path in files {
        let file = GgufFile::open(&path).unwrap();
        let kind = file
            .metadata("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // BERT's WordPiece, T5's Unigram and Gemma 4's BPE belong to families this project
        // does not run.
        if !["gpt2", "llama"].contains(&kind.as_str()) {
            report.push(format!("{name}: {kind} (not a kind our families use)"));
            continue;
        }
        let tokenizer = file.tokenizer().unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases = vectors(&path);
        let mut ok = 0;
        for (text, want) in &cases {
            let got = tokenizer.encode(text, false).unwrap();
            if &got == want {
                ok += 1;
            } else if failures.len() < 40 {
                failures.push(format!(
                    "{name}: {text:?}\n  ours      {got:?}\n  llama.cpp {want:?}"
                ));
            }
            // Streamed token by token, the ids give the text they give decoded whole.
            let whole = tokenizer.decode(want, false).unwrap();
            let mut decoder = IncrementalDecoder::new(false);
            let mut streamed = String::new();
            for &id in want {
                match decoder.push(&tokenizer, id) {
                    Ok(piece) => streamed.extend(piece),
                    Err(e) => panic!("{name}: {text:?}: {e}"),
                }
            }
            streamed.extend(decoder.finish(&tokenizer).unwrap());
            if streamed != whole && failures.len() < 40 {
                failures.push(format!(
                    "{name}: {text:?} streams as {streamed:?}, decodes whole as {whole:?}"
                ));
            }
        }
        report.push(format!("{name}: {ok}/{}", cases.len()));
        // Beyond the vectors: special tokens in text are matched whole, and a BOS goes first
        // where the kind or the file says so (Llama 3's BPE, SentencePiece).
        let bos = file
            .metadata("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok());
        let with = tokenizer.encode("Hello world", true).unwrap();
        let without = tokenizer.encode("Hello world", false).unwrap();
        if [
            "ggml-vocab-llama-bpe.gguf",
            "ggml-vocab-llama-spm.gguf",
            "ggml-vocab-phi-3.gguf",
        ]
        .contains(&name.as_str())
        {
            assert_eq!(with[0], bos.unwrap(), "{name}: BOS first");
            assert_eq!(&with[1..], without.as_slice(), "{name}");
        }
        if name == "ggml-vocab-qwen2.gguf" {
            let ids = tokenizer
                .encode("<|im_start|>user\nHi<|im_end|>", true)
                .unwrap();
            let start = tokenizer.token_id("<|im_start|>").unwrap();
            let end = tokenizer.token_id("<|im_end|>").unwrap();
            assert_eq!((ids[0], *ids.last().unwrap()), (start, end), "{ids:?}");
            let eog = cluster_engine::gguf_tokenizer::end_of_generation(&file).unwrap();
            assert!(eog.contains(&end), "{eog:?} lacks <|im_end|>");
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
