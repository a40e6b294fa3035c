//! Fuzzing as a test: model files damaged the way a cut-short download, a bad disk or a hostile
//! file damages them (`cluster_fixtures::damage`). GGUF files (Q8_0 and Q4_K) are opened alone
//! as a model (header, metadata, tokenizer built from the metadata, chat template), a
//! safetensors file beside its intact `config.json` and tokenizer; then every layer is loaded.
//! Every case must end in the model or in an error; a panic, an abort on an absurd allocation
//! or a hang is a failure, and proptest shrinks it to the fewest changes and keeps it in
//! `fuzz_model_files.regressions` beside this file, replayed first on every run.
//! `PROPTEST_CASES` sets the count (256 by default; `scripts/fuzz.sh` runs more).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::OnceLock;

use cluster_api::LayerSplit;
use cluster_engine::ModelFolder;
use cluster_engine::candle_core::quantized::GgmlDType;
use cluster_engine::candle_core::{DType, Device};
use cluster_fixtures::TinyModel;
use cluster_fixtures::damage::{Damage, apply, config, damages};
use proptest::prelude::*;

/// A model file to damage: its name, its bytes, the length of its header (where counts and
/// lengths sit) and the folder's other files, kept intact.
struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    head: usize,
    others: Vec<(String, Vec<u8>)>,
}

/// Wide enough for Q4_K.
fn model() -> TinyModel {
    TinyModel::llama().for_k_quants()
}

/// The GGUF file alone: its tokenizer and template are in its metadata.
fn gguf(dtype: GgmlDType) -> Seed {
    let dir = tempfile::tempdir().unwrap();
    let path = model().write_gguf(dir.path(), dtype).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content =
        cluster_engine::candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    Seed {
        name: "model.gguf",
        bytes: std::fs::read(&path).unwrap(),
        head: content.tensor_data_offset as usize,
        others: Vec::new(),
    }
}

/// The safetensors file, beside the folder's other files.
fn safetensors() -> Seed {
    let dir = tempfile::tempdir().unwrap();
    model().write(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let head = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let others = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "model.safetensors")
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    Seed {
        name: "model.safetensors",
        bytes,
        head,
        others,
    }
}

fn seeds() -> &'static [Seed; 3] {
    static SEEDS: OnceLock<[Seed; 3]> = OnceLock::new();
    SEEDS.get_or_init(|| [gguf(GgmlDType::Q8_0), gguf(GgmlDType::Q4K), safetensors()])
}

/// Writes `seed`'s folder with `bytes` as its model file, opens it and loads every layer;
/// `Err` is an answer, a panic is not.
fn open_and_load(seed: &Seed, bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let write = |name: &str, b: &[u8]| std::fs::write(dir.path().join(name), b);
    write(seed.name, bytes).map_err(|e| e.to_string())?;
    for (name, b) in &seed.others {
        write(name, b).map_err(|e| e.to_string())?;
    }
    let at: &Path = if seed.others.is_empty() {
        &dir.path().join(seed.name)
    } else {
        dir.path()
    };
    let folder = ModelFolder::open(at).map_err(|e| e.to_string())?;
    let layers = folder.config.num_hidden_layers;
    let split = LayerSplit::parse(&format!("0-{}", layers.saturating_sub(1)), layers)
        .map_err(|e| e.to_string())?;
    cluster_engine::generate::load_stages(&folder, &split, &Device::Cpu, DType::F32)
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn the_undamaged_seeds_load() {
    for seed in seeds() {
        open_and_load(seed, &seed.bytes).unwrap();
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_damaged_model_file_loads_or_is_refused(which in 0usize..3, damage in damages(4096, 6)) {
        let seed = &seeds()[which];
        // Word damage lands in the header, where counts and lengths are; the rest anywhere.
        let damage: Vec<Damage> = damage
            .into_iter()
            .map(|d| match d {
                Damage::Word { at, width, value } => Damage::Word { at: at % seed.head, width, value },
                other => other,
            })
            .collect();
        let damaged = apply(&seed.bytes, &damage);
        let outcome = std::panic::catch_unwind(|| open_and_load(seed, &damaged));
        prop_assert!(outcome.is_ok(), "{}: panicked on {damage:?}", seed.name);
    }
}
