//! GGUF files (llama.cpp's format, as Ollama and LM Studio hand models around): the header and
//! metadata are read once; a stage then reads only its own tensors, kept in their quantized types
//! and multiplied with candle's quantized matmul.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{Content, Value};

use crate::config::{Family, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::family::Bias;

/// An opened GGUF file: its metadata and where each tensor lies, no weights yet.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::BadWeights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// ggml's block types by number, as llama.cpp names them, and whether candle reads them.
const GGML_TYPES: &[(u32, &str, bool)] = &[
    (0, "F32", true),
    (1, "F16", true),
    (2, "Q4_0", true),
    (3, "Q4_1", true),
    (6, "Q5_0", true),
    (7, "Q5_1", true),
    (8, "Q8_0", true),
    (9, "Q8_1", true),
    (10, "Q2_K", true),
    (11, "Q3_K", true),
    (12, "Q4_K", true),
    (13, "Q5_K", true),
    (14, "Q6_K", true),
    (15, "Q8_K", true),
    (16, "IQ2_XXS", false),
    (17, "IQ2_XS", false),
    (18, "IQ3_XXS", false),
    (19, "IQ1_S", false),
    (20, "IQ4_NL", false),
    (21, "IQ3_S", false),
    (22, "IQ2_S", false),
    (23, "IQ4_XS", false),
    (24, "I8", false),
    (25, "I16", false),
    (26, "I32", false),
    (27, "I64", false),
    (28, "F64", false),
    (29, "IQ1_M", false),
    (30, "BF16", true),
    (34, "TQ1_0", false),
    (35, "TQ2_0", false),
    (39, "MXFP4", false),
];

/// The first tensor of a GGUF file whose block type cannot be read, named with its type, from a
/// walk over the header; `None` when the header does not parse that far or every type reads.
fn unreadable_tensor(path: &Path) -> Option<String> {
    use std::io::{BufReader, Read};
    /// Strings and arrays past this are not a header this walk believes.
    const LIMIT: u64 = 1 << 30;
    let mut r = BufReader::new(File::open(path).ok()?);
    let u32_ = |r: &mut BufReader<File>| -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    };
    let u64_ = |r: &mut BufReader<File>| -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let skip = |r: &mut BufReader<File>, n: u64| -> Option<()> {
        (n <= LIMIT).then_some(())?;
        std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).ok()?;
        Some(())
    };
    let string = |r: &mut BufReader<File>| -> Option<String> {
        let n = u64_(r)?;
        (n <= LIMIT).then_some(())?;
        let mut b = vec![0u8; n as usize];
        r.read_exact(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    };
    if u32_(&mut r)? != u32::from_le_bytes(*b"GGUF") || u32_(&mut r)? < 2 {
        return None;
    }
    let tensors = u64_(&mut r)?;
    let kvs = u64_(&mut r)?;
    // Value sizes by type: u8, i8, u16, i16, u32, i32, f32, bool, string, array, u64, i64, f64.
    fn fixed(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    for _ in 0..kvs {
        string(&mut r)?;
        let t = u32_(&mut r)?;
        match t {
            8 => {
                string(&mut r)?;
            }
            9 => {
                let inner = u32_(&mut r)?;
                let n = u64_(&mut r)?;
                match (inner, fixed(inner)) {
                    (_, Some(size)) => skip(&mut r, n.checked_mul(size)?)?,
                    (8, None) => {
                        (n <= LIMIT).then_some(())?;
                        for _ in 0..n {
                            string(&mut r)?;
                        }
                    }
                    _ => return None,
                }
            }
            t => skip(&mut r, fixed(t)?)?,
        }
    }
    for _ in 0..tensors.min(LIMIT) {
        let name = string(&mut r)?;
        let dims = u32_(&mut r)?;
        skip(&mut r, u64::from(dims) * 8)?;
        let kind = u32_(&mut r)?;
        u64_(&mut r)?;
        let known = GGML_TYPES.iter().find(|(id, ..)| *id == kind);
        if known.is_none_or(|(_, _, reads)| !reads) {
            let type_name = known.map_or_else(|| format!("type {kind}"), |(_, n, _)| n.to_string());
            let readable: Vec<&str> = GGML_TYPES
                .iter()
                .filter(|(.., reads)| *reads)
                .map(|(_, n, _)| *n)
                .collect();
            return Some(format!(
                "tensor {name} is {type_name}, a block type this engine cannot read (it reads {})",
                readable.join(", ")
            ));
        }
    }
    None
}

/// Where the data of a GGUF file whose first bytes are `prefix` begins (its header's end), or
/// `None` when `prefix` does not hold the whole header (or is no GGUF header at all).
pub fn header_end(prefix: &[u8]) -> Option<u64> {
    let content = Content::read(&mut std::io::Cursor::new(prefix)).ok()?;
    Some(content.tensor_data_offset)
}

impl GgufFile {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self> {
        crate::config::regular_file(path, "GGUF model file", u64::MAX)?;
        let mut file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                EngineError::MissingFile {
                    path: path.to_path_buf(),
                    what: "GGUF model file".into(),
                }
            } else {
                EngineError::io(path, e)
            }
        })?;
        let content = Content::read(&mut file).map_err(|e| {
            // candle names an unknown block type by number only: say which tensor and type.
            match unreadable_tensor(path) {
                Some(which) => bad(path, which),
                None => bad(
                    path,
                    format!("not a readable GGUF file: {}", crate::error::plain(e)),
                ),
            }
        })?;
        // Every tensor must lie within the file, and its shape must fill whole blocks: checked
        // here, when an apply opens the file, rather than when a stage reads it.
        let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(bad(
                    path,
                    format!(
                        "tensor {name}: shape {:?} holds {elems} values, not whole {:?} blocks of {block}",
                        info.shape.dims(),
                        info.ggml_dtype
                    ),
                ));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(bad(
                    path,
                    format!(
                        "tensor {name} ({:?}, shape {:?}) ends at byte {end}, past the file's {file_len} bytes; the file is truncated",
                        info.ggml_dtype,
                        info.shape.dims()
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Whether the file has a tensor of that name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape of a tensor, outermost dimension first (as candle and Hugging Face write them).
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// Bytes a tensor takes in the file (and in memory, kept in its stored type).
    pub fn tensor_bytes(&self, name: &str) -> u64 {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| {
                (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
            })
            .unwrap_or(0)
    }

    /// Where a tensor's bytes lie in the file: (first byte, end byte).
    pub fn tensor_range(&self, name: &str) -> Option<(u64, u64)> {
        let info = self.content.tensor_infos.get(name)?;
        let start = self.content.tensor_data_offset + info.offset;
        Some((start, start + self.tensor_bytes(name)))
    }

    /// Every tensor's name and byte range, in file order.
    pub fn all_ranges(&self) -> Vec<(String, u64, u64)> {
        let mut out: Vec<_> = self
            .content
            .tensor_infos
            .keys()
            .filter_map(|n| self.tensor_range(n).map(|(a, b)| (n.clone(), a, b)))
            .collect();
        out.sort_by_key(|(_, a, _)| *a);
        out
    }

    /// Where the header (metadata and tensor table) ends and the tensors' data begins.
    pub fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// Reads one tensor, in its stored type.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::MissingTensor {
                name: name.to_string(),
                place: self.path.clone(),
            });
        }
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.content.tensor(&mut *file, name, device).map_err(|e| {
            bad(
                &self.path,
                format!("tensor {name}: {}", crate::error::plain(e)),
            )
        })
    }

    fn arch(&self) -> Result<(String, Family)> {
        let arch = self
            .metadata("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| EngineError::config(&self.path, "general.architecture", "missing"))?;
        match Family::from_gguf_architecture(&arch) {
            Some(family) => Ok((arch, family)),
            None => Err(EngineError::UnsupportedArchitecture {
                path: self.path.clone(),
                name: arch,
                supported: crate::family::gguf_architectures(),
            }),
        }
    }

    fn u32_key(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_u32()
                .or_else(|_| v.to_u64().map(|n| n as u32))
                .map(|n| Some(n as usize))
                .map_err(|_| {
                    EngineError::config(&self.path, key, format!("expected an integer, got {v:?}"))
                }),
        }
    }

    fn f32_key(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(|x| Some(f64::from(x)))
                .or_else(|_| v.to_f64().map(Some))
                .map_err(|_| {
                    EngineError::config(&self.path, key, format!("expected a number, got {v:?}"))
                }),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.u32_key(key)?.ok_or_else(|| {
            EngineError::config(&self.path, key, "missing (required for this architecture)")
        })
    }

    /// The model's configuration, from the `{arch}.*` metadata keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let (arch, family) = self.arch()?;
        let spec = family.spec();
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = self.required(&k("embedding_length"))?;
        let num_attention_heads = self.required(&k("attention.head_count"))?;
        let num_key_value_heads = self
            .u32_key(&k("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        let head_dim = self
            .u32_key(&k("attention.key_length"))?
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let vocab_size = self
            .tensor_shape("token_embd.weight")
            .map(|s| s[0])
            .ok_or_else(|| EngineError::MissingTensor {
                name: "token_embd.weight".into(),
                place: self.path.clone(),
            })?;
        if self.has_tensor("rope_freqs.weight") {
            return Err(EngineError::config(
                &self.path,
                "rope_freqs.weight",
                "per-frequency rope factors (llama3 rope scaling in GGUF) are not supported yet",
            ));
        }
        if let Some(name) = ["rope_factors_long.weight", "rope_factors_short.weight"]
            .into_iter()
            .find(|n| self.has_tensor(n))
        {
            return Err(EngineError::config(
                &self.path,
                name,
                "long-context rope factors (Phi-3's longrope scaling) are not supported yet",
            ));
        }
        if let Some(dims) = self.u32_key(&k("rope.dimension_count"))?
            && dims != head_dim
        {
            return Err(EngineError::config(
                &self.path,
                k("rope.dimension_count"),
                format!(
                    "{dims} is not supported: rotary embeddings over part of a head ({head_dim}) are not implemented"
                ),
            ));
        }
        let sliding_window = match spec.window {
            crate::family::Window::EveryLayer => {
                match self.u32_key(&k("attention.sliding_window"))? {
                    Some(0) => None,
                    w => w,
                }
            }
            _ => None,
        };
        let rope_scaling = match self
            .metadata(&k("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            None => RopeScaling::None,
            Some(t) if t == "none" => RopeScaling::None,
            Some(t) if t == "linear" => RopeScaling::Linear {
                factor: self.f32_key(&k("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some(t) => {
                return Err(EngineError::config(
                    &self.path,
                    k("rope.scaling.type"),
                    format!("{t:?} is not supported; supported: none, linear"),
                ));
            }
        };
        let eos = crate::gguf_tokenizer::end_of_generation(self)?;
        Ok(ModelConfig {
            family,
            hidden_size,
            intermediate_size: self.required(&k("feed_forward_length"))?,
            vocab_size,
            num_hidden_layers: self.required(&k("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self
                .f32_key(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            rope_theta: self.f32_key(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.u32_key(&k("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qkv_bias: spec.qkv_bias != Bias::Never && self.has_tensor("blk.0.attn_q.bias"),
            o_bias: spec.o_bias != Bias::Never && self.has_tensor("blk.0.attn_output.bias"),
            mlp_bias: false,
            qk_norm: spec.qk_norm,
            sliding_window,
            dtype: None,
            bos_token_id: self
                .u32_key("tokenizer.ggml.bos_token_id")?
                .map(|n| n as u32),
            eos_token_ids: eos,
            rope_interleaved: spec.gguf_rope_interleaved,
            numerics: spec.gguf_numerics,
        })
    }

    /// A tokenizer built from the file's own metadata, as llama.cpp builds it (see
    /// [`crate::gguf_tokenizer`]).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::TextTokenizer> {
        crate::gguf_tokenizer::from_gguf(self)
    }

    /// The text of a token id in the file's vocabulary.
    pub fn token_text(&self, id: usize) -> Option<String> {
        let list = self.metadata("tokenizer.ggml.tokens")?.to_vec().ok()?;
        list.get(id)?.to_string().ok().cloned()
    }

    /// The chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.metadata("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
    }
}
