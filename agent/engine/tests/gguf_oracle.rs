//! GGUF stages, split every way, against candle-transformers' quantized whole-model forward
//! (`quantized_llama`, `quantized_qwen2`, `quantized_qwen3`, `quantized_phi3`) on the same file, in every block
//! type candle reads; and files quantized by llama.cpp's own quantizer, which the fixtures'
//! writer reproduces byte for byte, decoding llama.cpp's greedy tokens.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::{
    quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};
use cluster_engine::ModelFolder;
use cluster_engine::weights::Weights;
use cluster_fixtures::{Arch, TinyModel};
use common::{argmax, check_every_split, load_split};

const TOLERANCE: f32 = 1e-4;
/// Logits of stages whose products sum in another order than candle's on this CPU: Q2_K to
/// Q6_K always (our superblock kernels; candle's differ by CPU, and on x86 run on repacked
/// copies), Q4_0 and Q8_0 (ours repacked, in the order of candle's scalar reference kernels,
/// candle's in eight float lanes, or for Q8_0 with VNNI on its input rounded to 256-value
/// blocks). Each product is within float
/// rounding of candle's (the kernels' unit tests bound it), but the next product rounds its
/// input to 8 bits and now and then a last-bit difference flips a rounding, which random
/// weights amplify over the layers: 0.01-0.16 apart here, as with llama.cpp's order below. A
/// block read wrongly moves logits by whole units.
const REORDERED_TOLERANCE: f32 = 0.2;
const DECODE_STEPS: usize = 16;

/// The tolerance for a file whose matrices are in `types`.
fn tolerance_for(types: &[GgmlDType]) -> f32 {
    if types.iter().any(|t| {
        matches!(
            t,
            GgmlDType::Q2K
                | GgmlDType::Q3K
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
                | GgmlDType::Q8_0
                | GgmlDType::Q4_0
        )
    }) {
        REORDERED_TOLERANCE
    } else {
        TOLERANCE
    }
}

enum Oracle {
    Llama(Box<quantized_llama::ModelWeights>),
    Qwen2(Box<quantized_qwen2::ModelWeights>),
    Qwen3(Box<quantized_qwen3::ModelWeights>),
    Phi3(Box<quantized_phi3::ModelWeights>),
}

impl Oracle {
    fn load(path: &Path, arch: Arch) -> Oracle {
        let dev = Device::Cpu;
        let mut file = std::fs::File::open(path).unwrap();
        let ct = Content::read(&mut file).unwrap();
        match arch {
            Arch::Llama => Oracle::Llama(Box::new(
                quantized_llama::ModelWeights::from_gguf(ct, &mut file, &dev).unwrap(),
            )),
            Arch::Qwen2 => Oracle::Qwen2(Box::new(
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut file, &dev).unwrap(),
            )),
            Arch::Qwen3 => Oracle::Qwen3(Box::new(
                quantized_qwen3::ModelWeights::from_gguf(ct, &mut file, &dev).unwrap(),
            )),
            Arch::Phi3 => Oracle::Phi3(Box::new(
                quantized_phi3::ModelWeights::from_gguf(false, ct, &mut file, &dev).unwrap(),
            )),
            Arch::Mistral => unreachable!("no GGUF fixture for Mistral"),
        }
    }

    fn forward(&mut self, tokens: &[u32], position: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match self {
            Oracle::Llama(m) => m.forward(&input, position).unwrap(),
            Oracle::Qwen2(m) => m.forward(&input, position).unwrap(),
            Oracle::Qwen3(m) => m.forward(&input, position).unwrap(),
            Oracle::Phi3(m) => m.forward(&input, position).unwrap(),
        };
        logits.flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// Q4_K packs 256 values per block along each row, so every matrix's inner width is 256 or 512.
fn model(arch: Arch) -> TinyModel {
    TinyModel::of(arch).for_k_quants()
}

fn check(arch: Arch, dtype: GgmlDType) {
    check_with(
        arch,
        &format!("{dtype:?}"),
        &|_| dtype,
        tolerance_for(&[dtype]),
    );
}

/// [`check`] with each matrix in the type `dtype_of` gives its GGUF name.
fn check_with(arch: Arch, dtype: &str, dtype_of: &dyn Fn(&str) -> GgmlDType, tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    let path = model(arch).write_gguf_with(dir.path(), dtype_of).unwrap();
    let folder = ModelFolder::open(&path).unwrap();
    assert!(matches!(folder.weights, Weights::Gguf(_)));
    assert_eq!(folder.config.num_hidden_layers, 4);
    let prompt_a = folder
        .tokenizer
        .encode("The two machines sat side by side on the shelf.", true)
        .unwrap();
    let prompt_b = folder
        .tokenizer
        .encode("What is the capital of France?", true)
        .unwrap();
    let mut oracle_a = Oracle::load(&path, arch);
    let mut oracle_b = Oracle::load(&path, arch);
    let mut expected = Vec::new();
    let (mut ta, mut tb) = (
        oracle_a.forward(&prompt_a, 0),
        oracle_b.forward(&prompt_b, 0),
    );
    expected.push((ta.clone(), tb.clone()));
    for step in 0..DECODE_STEPS {
        ta = oracle_a.forward(&[argmax(&ta)], prompt_a.len() + step);
        tb = oracle_b.forward(&[argmax(&tb)], prompt_b.len() + step);
        expected.push((ta.clone(), tb.clone()));
    }
    // Prompts go in whole, as the oracle takes them: a chunked prefill computes attention in
    // other pieces, and the 8-bit rounding of the next matmul's input can turn that last-bit
    // difference into a visible one (the f32 oracle test covers chunking).
    check_every_split(
        &folder,
        &prompt_a,
        &prompt_b,
        prompt_a.len(),
        &expected,
        tolerance,
        &format!("{arch:?} {dtype}"),
    );
    // A stage of half the layers holds about half of the layers' bytes, in their quantized size.
    let whole = &load_split(&folder, "0-3")[0];
    let half = &load_split(&folder, "0-1,2-3")[1];
    let share = half.weight_bytes() as f64 / whole.weight_bytes() as f64;
    assert!((0.4..0.6).contains(&share), "{share}");
    // Held as stored, the embedding included (a lookup dequantizes only its rows): well under
    // the f32 checkpoint the GGUF was made from, and at most 1.05x the tensors' bytes in the file.
    let f32_bytes = std::fs::metadata(dir.path().join("model.safetensors"))
        .unwrap()
        .len() as f64;
    let held = whole.weight_bytes() as f64;
    assert!(
        held < 0.6 * f32_bytes,
        "{held} bytes held for a {f32_bytes}-byte f32 model"
    );
    let file = cluster_engine::gguf::GgufFile::open(&path).unwrap();
    let stored: u64 = cluster_engine::Stage::gguf_tensor_list(
        &folder.config,
        cluster_api::LayerRange { first: 0, last: 3 },
        true,
        true,
    )
    .iter()
    .map(|(name, _)| file.tensor_bytes(name))
    .sum();
    assert!(
        held <= 1.05 * stored as f64,
        "{dtype}: {held} bytes held for {stored} bytes of tensors in the file"
    );
}

#[test]
fn llama_gguf_q8_0_matches_quantized_llama() {
    check(Arch::Llama, GgmlDType::Q8_0);
}

#[test]
fn llama_gguf_q4_k_matches_quantized_llama() {
    check(Arch::Llama, GgmlDType::Q4K);
}

#[test]
fn qwen2_gguf_q8_0_matches_quantized_qwen2() {
    check(Arch::Qwen2, GgmlDType::Q8_0);
}

#[test]
fn qwen2_gguf_q4_k_matches_quantized_qwen2() {
    check(Arch::Qwen2, GgmlDType::Q4K);
}

#[test]
fn qwen3_gguf_q8_0_matches_quantized_qwen3() {
    check(Arch::Qwen3, GgmlDType::Q8_0);
}

#[test]
fn qwen3_gguf_q4_k_matches_quantized_qwen3() {
    check(Arch::Qwen3, GgmlDType::Q4K);
}

#[test]
fn phi3_gguf_q8_0_matches_quantized_phi3() {
    check(Arch::Phi3, GgmlDType::Q8_0);
}

#[test]
fn phi3_gguf_q4_k_and_q4_1_match_quantized_phi3() {
    // Q4_1 sums in candle's order, so its stages stay within 1e-4 of the oracle.
    for dtype in [GgmlDType::Q4K, GgmlDType::Q4_1] {
        check(Arch::Phi3, dtype);
    }
}

#[test]
fn other_block_formats_match_too() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
    ] {
        check(Arch::Llama, dtype);
    }
}

#[test]
fn the_remaining_block_formats_match_too() {
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::BF16,
    ] {
        check(Arch::Llama, dtype);
    }
}

#[test]
fn a_mix_of_block_formats_in_one_file_matches_as_q4_k_m_does() {
    // As llama.cpp's Q4_K_M: attn_v and ffn_down at Q6_K, the embedding at Q8_0 (tied here, so
    // also the head), the rest Q4_K.
    check_with(
        Arch::Qwen3,
        "Q4_K_M-like mix",
        &|name| {
            if name.contains("attn_v") || name.contains("ffn_down") {
                GgmlDType::Q6K
            } else if name.starts_with("token_embd") {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q4K
            }
        },
        REORDERED_TOLERANCE,
    );
}

#[test]
fn an_unsupported_gguf_architecture_is_named_with_the_supported_ones() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma.gguf");
    let q = candle_core::quantized::QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("gemma2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
    drop(f);
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = ModelFolder::open(&path).err().unwrap().to_string();
    assert!(
        err.contains("\"gemma2\" is not supported") && err.contains("llama, qwen2, qwen3, phi3"),
        "{err}"
    );
}

#[test]
fn a_truncated_gguf_or_a_block_type_candle_cannot_read_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(Arch::Llama)
        .write_gguf(dir.path(), GgmlDType::Q8_0)
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = cluster_engine::gguf::GgufFile::open(&cut)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor ") && err.contains("the file is truncated"),
        "{err}"
    );

    // llama.cpp's IQ4_NL, written by llama.cpp's own gguf package.
    let iq = dir.path().join("iq.gguf");
    let script = format!(
        "import gguf, numpy as np\n\
         w = gguf.GGUFWriter({iq:?}, 'llama')\n\
         w.add_tensor('token_embd.weight', np.zeros((4, 32), dtype=np.float32))\n\
         w.add_tensor('blk.0.attn_q.weight', np.zeros((4, 18), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)\n\
         w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()\n",
        iq = iq.to_str().unwrap()
    );
    let ran = std::process::Command::new("python3")
        .args(["-c", &script])
        .output();
    match ran {
        Ok(o) if o.status.success() => {
            let err = cluster_engine::gguf::GgufFile::open(&iq)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tensor blk.0.attn_q.weight is IQ4_NL, a block type this engine cannot read (it reads F32, F16, Q4_0"),
                "{err}"
            );
        }
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            cluster_fixtures::skip(&format!(
                "python3 with gguf not found (pip install gguf): {why}"
            ));
        }
    }
}

/// The type name llama.cpp's gguf package gives each GGUF block type.
fn gguf_type(name: &str) -> GgmlDType {
    match name {
        "F32" => GgmlDType::F32,
        "F16" => GgmlDType::F16,
        "BF16" => GgmlDType::BF16,
        "Q4_0" => GgmlDType::Q4_0,
        "Q4_1" => GgmlDType::Q4_1,
        "Q5_0" => GgmlDType::Q5_0,
        "Q5_1" => GgmlDType::Q5_1,
        "Q8_0" => GgmlDType::Q8_0,
        "Q2_K" => GgmlDType::Q2K,
        "Q3_K" => GgmlDType::Q3K,
        "Q4_K" => GgmlDType::Q4K,
        "Q5_K" => GgmlDType::Q5K,
        "Q6_K" => GgmlDType::Q6K,
        other => panic!("llama.cpp wrote a {other} tensor, which this test does not expect"),
    }
}

/// Every tensor of a GGUF file: name -> (type, sha256 of its bytes as stored).
fn tensor_digests(path: &Path) -> std::collections::BTreeMap<String, (GgmlDType, String)> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let bytes = q.data().unwrap();
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.insert(name.clone(), (q.dtype(), digest));
    }
    out
}

/// How far our logits (about 2 here) may be from llama.cpp's, for files of 16-bit floats and of
/// quantized blocks. llama.cpp multiplies half-precision weights with its activations rounded
/// to the same half precision (we keep them f32): 0.002-0.016 apart here. On quantized files
/// the two are 0.02-0.10 apart, every step: both round each product's input to 8-bit blocks,
/// and llama.cpp sums in another order, so now and then a last-bit difference flips one
/// rounding, which random weights amplify (reordering only our own sums moved these logits by
/// 0.03-0.05 against candle's). Reading a block wrongly moves logits much further: llama.cpp's
/// own logits for one model move by 0.2-0.6 between its block types.
const LLAMA_CPP_TOLERANCE: (f32, f32) = (0.02, 0.15);

/// The model `tests/tools/llamacpp_quantize.py` quantized with llama.cpp (its usage line gives
/// the same shape to `clusteragent make-model`): two layers, every matrix 256 wide.
fn llamacpp_model() -> TinyModel {
    TinyModel {
        layers: 2,
        intermediate: 256,
        ..model(Arch::Llama)
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// `tests/tools/llamacpp_quantize.py` quantized the F32 GGUF of [`llamacpp_model`] with
/// llama.cpp's own quantizer (llama-quantize's code, llama-cpp-python 0.3.36): every 32-value
/// block type, F16 and BF16 pure, and the Q2_K, Q3_K_M, Q4_K_M and Q5_K_M files people download,
/// as llama.cpp mixes them. It recorded each tensor's type and hash, and llama.cpp's greedy
/// tokens with the eight best logits of each step.
///
/// For the pure files, the fixtures' writer must write the very bytes llama.cpp wrote, so every
/// such file the oracle tests above check is a file llama.cpp makes. llama.cpp's K-quant
/// quantizer chooses other scales than candle's, so its K files are kept whole in
/// `tests/data/llamacpp/`. Then each file, split over two stages, must give llama.cpp's logits
/// along llama.cpp's tokens (within [`LLAMA_CPP_TOLERANCE`]), and its greedy token wherever the
/// choice is clear; the K files also candle-transformers' logits (within [`TOLERANCE`]).
#[test]
fn files_quantized_by_llama_cpp_are_the_fixtures_files_and_decode_its_tokens() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data");
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("llamacpp-quantized.json")).unwrap(),
    )
    .unwrap();
    let digests_of = |tensors: &serde_json::Value| -> Vec<(String, String, String)> {
        tensors
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["type"].as_str().unwrap().to_string(),
                    t["sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let compare = |ours: &std::collections::BTreeMap<String, (GgmlDType, String)>,
                   theirs: &[(String, String, String)],
                   what: &str| {
        assert_eq!(ours.len(), theirs.len(), "{what}: tensor count");
        for (name, ty, sha) in theirs {
            let (our_ty, our_sha) = ours
                .get(name)
                .unwrap_or_else(|| panic!("{what}: no tensor {name}"));
            assert_eq!(*our_ty, gguf_type(ty), "{what}: tensor {name}'s type");
            assert_eq!(
                our_sha, sha,
                "{what}: tensor {name} ({ty}) is not byte for byte llama.cpp's"
            );
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let source = llamacpp_model()
        .write_gguf_with(dir.path(), &|_| GgmlDType::F32)
        .unwrap();
    compare(
        &tensor_digests(&source),
        &digests_of(&record["source"]),
        "the F32 source",
    );

    let prompt = ids(&record["prompt_ids"]);
    let files = record["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    for expected in [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M",
    ] {
        assert!(names.contains(&expected), "no {expected} file in {names:?}");
    }
    let mut types_seen = std::collections::BTreeSet::new();
    let (mut clear_steps, mut all_steps) = (0, 0);
    for file in files {
        let name = file["name"].as_str().unwrap();
        let theirs = digests_of(&file["tensors"]);
        let dir = tempfile::tempdir().unwrap();
        let path = match file["kept"].as_str() {
            Some(kept) => {
                let path = data.join("llamacpp").join(kept);
                compare(&tensor_digests(&path), &theirs, name);
                path
            }
            None => {
                let types: std::collections::HashMap<String, GgmlDType> = theirs
                    .iter()
                    .map(|(n, t, _)| (n.clone(), gguf_type(t)))
                    .collect();
                let path = llamacpp_model()
                    .write_gguf_with(dir.path(), &|tensor| types[tensor])
                    .unwrap();
                compare(&tensor_digests(&path), &theirs, name);
                path
            }
        };
        types_seen.extend(theirs.iter().map(|(_, t, _)| t.clone()));

        let tokens = ids(&file["token_ids"]);
        let top = file["top"].as_array().unwrap();
        assert_eq!(top.len(), tokens.len(), "{name}: steps recorded");
        let folder = ModelFolder::open(&path).unwrap();
        let stages = load_split(&folder, "0-0,1-1");
        let mut oracle = file["kept"]
            .as_str()
            .map(|_| Oracle::load(&path, Arch::Llama));
        let tolerance = if name.ends_with("F16") {
            LLAMA_CPP_TOLERANCE.0
        } else {
            LLAMA_CPP_TOLERANCE.1
        };
        let types: Vec<GgmlDType> = theirs.iter().map(|(_, t, _)| gguf_type(t)).collect();
        let against_candle = tolerance_for(&types);
        let mut worst = 0f32;
        for (step, best) in top.iter().enumerate() {
            let (position, input) = if step == 0 {
                (0, prompt.clone())
            } else {
                (prompt.len() + step - 1, vec![tokens[step - 1]])
            };
            let logits = common::run_stages(&stages, 1, position, &input);
            if let Some(oracle) = oracle.as_mut() {
                let expected = oracle.forward(&input, position);
                common::assert_close(
                    &logits,
                    &expected,
                    against_candle,
                    &format!("{name} against candle-transformers, step {step}"),
                );
            }
            let best = best.as_array().unwrap();
            for pair in best {
                let id = pair[0].as_u64().unwrap() as usize;
                let theirs = pair[1].as_f64().unwrap() as f32;
                worst = worst.max((logits[id] - theirs).abs());
                assert!(
                    (logits[id] - theirs).abs() <= tolerance,
                    "{name} step {step}: token {id}'s logit is {} here, {theirs} in llama.cpp",
                    logits[id]
                );
            }
            let margin = best[0][1].as_f64().unwrap() - best[1][1].as_f64().unwrap();
            all_steps += 1;
            if margin > 2.0 * tolerance as f64 {
                clear_steps += 1;
                assert_eq!(
                    argmax(&logits),
                    tokens[step],
                    "{name} step {step}: llama.cpp's greedy token (margin {margin})"
                );
            }
        }
        for stage in &stages {
            stage.release(1);
        }
        eprintln!(
            "{name}: tensors byte for byte llama.cpp's; logits within {worst:.4} of llama.cpp's \
             over {} steps",
            top.len()
        );
    }
    for ty in [
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0", "BF16",
    ] {
        assert!(types_seen.contains(ty), "no {ty} tensor in {types_seen:?}");
    }
    // Random weights give flat distributions: few steps are clear choices, and the logits
    // above are the comparison that counts.
    eprintln!("{clear_steps} of {all_steps} steps were clear choices, each llama.cpp's token");
}
