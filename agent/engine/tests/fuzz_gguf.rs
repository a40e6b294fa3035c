//! Fuzzing as a test: GGUF files damaged the way a cut-short download, a bad disk or a hostile
//! file damages them (`cluster_fixtures::damage`), opened as a model folder (header, metadata,
//! tokenizer built from the metadata, chat template) and loaded as a whole-model stage. Every
//! case must end in the model or in an error; a panic, an abort on an absurd allocation or a
//! hang is a failure, and proptest shrinks it to the fewest changes and keeps it in
//! `fuzz_gguf.regressions` beside this file, replayed first on every run. `PROPTEST_CASES` sets the
//! count (256 by default; `scripts/fuzz.sh` runs more).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use cluster_api::LayerSplit;
use cluster_engine::ModelFolder;
use cluster_engine::candle_core::quantized::GgmlDType;
use cluster_engine::candle_core::{DType, Device};
use cluster_fixtures::TinyModel;
use cluster_fixtures::damage::{apply, config, damages};
use proptest::prelude::*;

/// A tiny model's GGUF file alone (its tokenizer and template only in the metadata), and the
/// length of its header: the part before the first tensor's bytes.
fn seed(dtype: GgmlDType) -> (Vec<u8>, usize) {
    let dir = tempfile::tempdir().unwrap();
    // Q4_K packs 256 values per block along each row.
    let model = TinyModel {
        hidden: 256,
        intermediate: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ..TinyModel::llama()
    };
    let path = model.write_gguf(dir.path(), dtype).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content =
        cluster_engine::candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    (bytes, content.tensor_data_offset as usize)
}

fn seeds() -> &'static [(Vec<u8>, usize); 2] {
    static SEEDS: OnceLock<[(Vec<u8>, usize); 2]> = OnceLock::new();
    SEEDS.get_or_init(|| [seed(GgmlDType::Q8_0), seed(GgmlDType::Q4K)])
}

/// Opens `bytes` as a model file and loads every layer; `Err` is an answer, a panic is not.
fn open_and_load(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path: PathBuf = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let folder = ModelFolder::open(&path).map_err(|e| e.to_string())?;
    let layers = folder.config.num_hidden_layers;
    let split = LayerSplit::parse(&format!("0-{}", layers.saturating_sub(1)), layers)
        .map_err(|e| e.to_string())?;
    cluster_engine::generate::load_stages(&folder, &split, &Device::Cpu, DType::F32)
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn the_undamaged_seeds_load() {
    for (bytes, _) in seeds() {
        open_and_load(bytes).unwrap();
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_damaged_gguf_loads_or_is_refused(which in 0usize..2, damage in damages(4096, 6)) {
        let (bytes, head) = &seeds()[which];
        // Word damage lands in the header and metadata; the rest anywhere.
        let damage: Vec<_> = damage
            .into_iter()
            .map(|d| match d {
                cluster_fixtures::damage::Damage::Word { at, width, value } => {
                    cluster_fixtures::damage::Damage::Word { at: at % head, width, value }
                }
                other => other,
            })
            .collect();
        let damaged = apply(bytes, &damage);
        let outcome = std::panic::catch_unwind(|| open_and_load(&damaged));
        prop_assert!(outcome.is_ok(), "panicked on {damage:?}");
    }
}
