//! Reading only the tensors a stage needs from safetensors files.
//!
//! A stage of a 28-layer model must not pay for the other stages' layers: we parse the small
//! JSON headers, then seek to and read exactly the byte ranges of the tensors asked for. Shards
//! are located through `model.safetensors.index.json` without opening the ones we do not need.
//! Reading (rather than memory-mapping) keeps the stage's resident memory equal to its share and
//! needs no `unsafe`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Headers bigger than this are refused: real ones are a few hundred kilobytes.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// A model's weights: Hugging Face safetensors, or one GGUF file.
pub enum Weights {
    /// `model.safetensors` or shards listed in its index.
    Safetensors(WeightFiles),
    /// A `.gguf` file, quantized or not.
    Gguf(crate::gguf::GgufFile),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Safetensors(w) => w.fmt(f),
            Self::Gguf(g) => g.fmt(f),
        }
    }
}

/// Where each tensor of a checkpoint lives, before any weights file is opened.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    dir: PathBuf,
    /// Tensor name to shard file name, from the index; `None` for a single-file checkpoint.
    index: Option<HashMap<String, String>>,
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offsets in the file.
    start: u64,
    end: u64,
}

/// Tensors read for a stage, each with the file it came from (for error messages).
#[derive(Debug, Default)]
pub struct LoadedTensors {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// Bytes of weights held, in the stage's dtype.
    pub bytes: u64,
    /// The weights files that were opened.
    pub files: Vec<PathBuf>,
}

impl WeightFiles {
    /// Finds the checkpoint in `dir`: the index of a sharded one, or `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            let obj = crate::config::read_json_object(&index_path)?;
            let map = obj
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    EngineError::config(&index_path, "weight_map", "missing or not an object")
                })?;
            let mut index = HashMap::with_capacity(map.len());
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    EngineError::config(
                        &index_path,
                        format!("weight_map.{name}"),
                        format!("expected a file name, got {file}"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(EngineError::config(
                        &index_path,
                        format!("weight_map.{name}"),
                        format!("{file:?} is not a plain file name in the model folder"),
                    ));
                }
                index.insert(name.clone(), file.to_string());
            }
            return Ok(Self {
                dir: dir.to_path_buf(),
                index: Some(index),
            });
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            crate::config::regular_file(&single, "safetensors weights", u64::MAX)?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                index: None,
            });
        }
        Err(EngineError::MissingFile {
            path: dir.join(SINGLE_FILE),
            what: format!("no weights: expected {SINGLE_FILE} or {INDEX_FILE}"),
        })
    }

    fn file_of(&self, name: &str) -> Result<PathBuf> {
        match &self.index {
            None => Ok(self.dir.join(SINGLE_FILE)),
            Some(index) => index.get(name).map(|f| self.dir.join(f)).ok_or_else(|| {
                EngineError::MissingTensor {
                    name: name.to_string(),
                    place: self.dir.join(INDEX_FILE),
                }
            }),
        }
    }

    /// Whether the checkpoint lists a tensor, without reading any weights.
    pub fn lists(&self, name: &str) -> Result<bool> {
        match &self.index {
            Some(index) => Ok(index.contains_key(name)),
            None => Ok(read_header(&self.dir.join(SINGLE_FILE))?.contains_key(name)),
        }
    }

    /// Every tensor of every weights file: (file, name, first byte, end byte), from headers.
    pub fn all_ranges(&self) -> Result<Vec<(PathBuf, String, u64, u64)>> {
        let files: std::collections::BTreeSet<PathBuf> = match &self.index {
            None => [self.dir.join(SINGLE_FILE)].into(),
            Some(index) => index.values().map(|f| self.dir.join(f)).collect(),
        };
        let mut out = Vec::new();
        for path in files {
            let mut entries: Vec<_> = read_header(&path)?.into_iter().collect();
            entries.sort_by_key(|(_, e)| e.start);
            out.extend(
                entries
                    .into_iter()
                    .map(|(name, e)| (path.clone(), name, e.start, e.end)),
            );
        }
        Ok(out)
    }

    /// Where in which file each of `names` lies: (file, first byte, end byte), reading only
    /// headers. Used to fetch exactly a stage's bytes before it loads.
    pub fn ranges(&self, names: &[String]) -> Result<Vec<(PathBuf, u64, u64)>> {
        let mut headers: BTreeMap<PathBuf, HashMap<String, TensorEntry>> = BTreeMap::new();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let path = self.file_of(name)?;
            if !headers.contains_key(&path) {
                let header = read_header(&path)?;
                headers.insert(path.clone(), header);
            }
            let entry = headers[&path]
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: name.clone(),
                    place: path.clone(),
                })?;
            out.push((path, entry.start, entry.end));
        }
        Ok(out)
    }

    /// Reads `wanted` tensors (name and expected shape), converted to `dtype` on `device`.
    ///
    /// `progress` is called with (bytes read so far, bytes to read in all) after each tensor.
    pub fn load(
        &self,
        wanted: &[(String, Vec<usize>)],
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LoadedTensors> {
        // Group by file so each file is opened, and its header parsed, once.
        let mut by_file: BTreeMap<PathBuf, Vec<&(String, Vec<usize>)>> = BTreeMap::new();
        for item in wanted {
            by_file
                .entry(self.file_of(&item.0)?)
                .or_default()
                .push(item);
        }
        let mut headers = Vec::with_capacity(by_file.len());
        let mut total = 0u64;
        for (path, items) in &by_file {
            if !path.is_file() {
                let listed = if self.index.is_some() {
                    format!(" (listed in {INDEX_FILE} for tensor {})", items[0].0)
                } else {
                    String::new()
                };
                return Err(EngineError::MissingFile {
                    path: path.clone(),
                    what: format!("weights shard{listed}"),
                });
            }
            let header = read_header(path)?;
            for (name, expected) in items {
                let entry = header.get(name).ok_or_else(|| EngineError::MissingTensor {
                    name: name.clone(),
                    place: path.clone(),
                })?;
                if &entry.shape != expected {
                    return Err(EngineError::TensorShape {
                        path: path.clone(),
                        name: name.clone(),
                        expected: expected.clone(),
                        actual: entry.shape.clone(),
                    });
                }
                total += entry.end - entry.start;
            }
            headers.push(header);
        }
        let mut loaded = LoadedTensors::default();
        let mut done = 0u64;
        for ((path, items), header) in by_file.iter().zip(headers) {
            let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
            loaded.files.push(path.clone());
            for (name, _) in items {
                let entry = &header[name.as_str()];
                let len = (entry.end - entry.start) as usize;
                file.seek(SeekFrom::Start(entry.start))
                    .map_err(|e| EngineError::io(path, e))?;
                let tensor = read_tensor(&mut file, entry).map_err(|e| match e {
                    ReadError::Io(e) => EngineError::io(path, e),
                    ReadError::Candle(e) => e.into(),
                })?;
                let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
                loaded.bytes += (tensor.elem_count() * dtype.size_in_bytes()) as u64;
                loaded.tensors.insert(name.clone(), (tensor, path.clone()));
                done += len as u64;
                progress(done, total);
            }
        }
        Ok(loaded)
    }
}

enum ReadError {
    Io(std::io::Error),
    Candle(candle_core::Error),
}

/// Reads one tensor's bytes straight into the vector that becomes its storage: reading them into
/// a byte buffer first and converting would hold the tensor twice, which for a real model's
/// embedding (600 MB in bf16) is what a stage's memory bound cannot spare.
fn read_tensor(file: &mut File, entry: &TensorEntry) -> std::result::Result<Tensor, ReadError> {
    use half::vec::HalfBitsVecExt;
    let n: usize = entry.shape.iter().product();
    let shape = entry.shape.as_slice();
    let tensor = match entry.dtype {
        DType::F32 => {
            let mut v = vec![0u32; n];
            file.read_exact(bytemuck::cast_slice_mut(&mut v))
                .map_err(ReadError::Io)?;
            let v: Vec<f32> = v
                .into_iter()
                .map(|b| f32::from_bits(u32::from_le(b)))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        }
        DType::F64 => {
            let mut v = vec![0u64; n];
            file.read_exact(bytemuck::cast_slice_mut(&mut v))
                .map_err(ReadError::Io)?;
            let v: Vec<f64> = v
                .into_iter()
                .map(|b| f64::from_bits(u64::from_le(b)))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        }
        DType::BF16 | DType::F16 => {
            let mut v = vec![0u16; n];
            file.read_exact(bytemuck::cast_slice_mut(&mut v))
                .map_err(ReadError::Io)?;
            if cfg!(target_endian = "big") {
                v.iter_mut().for_each(|b| *b = u16::from_le(*b));
            }
            if entry.dtype == DType::BF16 {
                Tensor::from_vec(v.reinterpret_into::<half::bf16>(), shape, &Device::Cpu)
            } else {
                Tensor::from_vec(v.reinterpret_into::<half::f16>(), shape, &Device::Cpu)
            }
        }
        other => {
            return Err(ReadError::Candle(candle_core::Error::Msg(format!(
                "tensor dtype {other:?} cannot be read"
            ))));
        }
    };
    tensor.map_err(ReadError::Candle)
}

impl LoadedTensors {
    /// Takes a tensor out of the set; every tensor asked for in `load` is present.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .map(|(t, _)| t)
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
                place: PathBuf::from("(tensors loaded for this stage)"),
            })
    }
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::BadWeights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses a safetensors header, checking every entry against the file's length.
fn read_header(path: &Path) -> Result<HashMap<String, TensorEntry>> {
    crate::config::regular_file(path, "safetensors weights", u64::MAX)?;
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| {
        bad(
            path,
            "not a safetensors file: shorter than its 8-byte header length",
        )
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(bad(
            path,
            format!(
                "not a safetensors file: header length {header_len} does not fit the file's {file_len} bytes"
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| EngineError::io(path, e))?;
    let json: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + header_len;
    let mut entries = HashMap::with_capacity(json.len());
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| {
            info.get(k)
                .ok_or_else(|| bad(path, format!("tensor {name}: header lacks `{k}`")))
        };
        let dtype = match field("dtype")?.as_str() {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            other => {
                return Err(bad(
                    path,
                    format!(
                        "tensor {name}: dtype {other:?} is not supported (F32, F16, BF16, F64)"
                    ),
                ));
            }
        };
        let shape: Vec<usize> = serde_json::from_value(field("shape")?.clone()).map_err(|_| {
            bad(
                path,
                format!("tensor {name}: `shape` is not a list of sizes"),
            )
        })?;
        let offsets: [u64; 2] =
            serde_json::from_value(field("data_offsets")?.clone()).map_err(|_| {
                bad(
                    path,
                    format!("tensor {name}: `data_offsets` is not [start, end]"),
                )
            })?;
        let expected = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if offsets[1] < offsets[0] || offsets[1] - offsets[0] != expected {
            return Err(bad(
                path,
                format!(
                    "tensor {name}: data_offsets {offsets:?} hold {} bytes but shape {shape:?} in {dtype:?} needs {expected}",
                    offsets[1].saturating_sub(offsets[0])
                ),
            ));
        }
        if data_start + offsets[1] > file_len {
            return Err(bad(
                path,
                format!(
                    "tensor {name}: data ends at byte {} past the file's end ({file_len} bytes); the file is truncated",
                    data_start + offsets[1]
                ),
            ));
        }
        entries.insert(
            name,
            TensorEntry {
                dtype,
                shape,
                start: data_start + offsets[0],
                end: data_start + offsets[1],
            },
        );
    }
    Ok(entries)
}
