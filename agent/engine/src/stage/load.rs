//! Loading a stage: the tensors it needs (and only those) from safetensors or GGUF files.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm};
use cluster_api::LayerRange;

use super::layer::{Attention, DecoderLayer, Mlp};
use super::linear::{PackedBlocks, Proj};
use super::{Head, Stage, StageSpec, TokenEmbedding};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::family::{self, Format, LayerNames, Part};
use crate::gguf::GgufFile;
use crate::rope::RotaryTable;
use crate::weights::{LoadedTensors, WeightFiles, Weights};

impl Stage {
    /// Names and shapes of the tensors a stage with this spec reads from a safetensors
    /// checkpoint (see [`family::stage_tensors`]).
    pub fn tensor_list(
        cfg: &ModelConfig,
        range: LayerRange,
        first: bool,
        last: bool,
    ) -> Vec<(String, Vec<usize>)> {
        family::stage_tensors(cfg, Format::Safetensors, range.iter(), first, last)
    }

    /// The same tensors as [`Stage::tensor_list`], under llama.cpp's names.
    pub fn gguf_tensor_list(
        cfg: &ModelConfig,
        range: LayerRange,
        first: bool,
        last: bool,
    ) -> Vec<(String, Vec<usize>)> {
        family::stage_tensors(cfg, Format::Gguf, range.iter(), first, last)
    }

    /// Loads the stage's tensors, and only those. `progress` gets (bytes read, bytes to read).
    pub fn load(spec: StageSpec<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<Self> {
        match spec.weights {
            Weights::Safetensors(files) => Self::load_safetensors(spec, files, progress),
            Weights::Gguf(file) => Self::load_gguf(spec, file, progress),
        }
    }

    fn load_safetensors(
        spec: StageSpec<'_>,
        files: &WeightFiles,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        let cfg = spec.config;
        spec.range.check_within(cfg.num_hidden_layers)?;
        let list = Self::tensor_list(&cfg, spec.range, spec.first, spec.last);
        let mut t = files.load(&list, spec.dtype, &spec.device, progress)?;
        let act = super::activation_dtype(spec.dtype, &spec.device);
        let eps = cfg.rms_norm_eps;
        let format = Format::Safetensors;
        let embed_weight = if spec.first || (spec.last && cfg.tie_word_embeddings) {
            Some(t.take(format.embed())?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.range.len());
        for i in spec.range.iter() {
            let mut source = SafetensorsLayer { t: &mut t, act };
            layers.push(build_layer(
                &mut source,
                &cfg,
                &LayerNames::new(&cfg, format, i),
            )?);
        }
        let head = if spec.last {
            let lm_weight = match (&embed_weight, cfg.tie_word_embeddings) {
                (Some(w), true) => w.clone(),
                _ => t.take(format.lm_head())?,
            };
            Some(Head {
                norm: RmsNorm::new(small(&mut t, format.final_norm(), act)?, eps),
                lm_head: Proj::Dense(Linear::new(lm_weight, None)),
            })
        } else {
            None
        };
        let embed = match (spec.first, embed_weight) {
            (true, Some(w)) => Some(TokenEmbedding::Dense(Embedding::new(w, cfg.hidden_size))),
            _ => None,
        };
        Ok(Self {
            rotary: RotaryTable::new(&cfg),
            config: cfg,
            range: spec.range,
            device: spec.device,
            dtype: spec.dtype,
            act,
            embed,
            layers,
            head,
            caches: Mutex::new(HashMap::new()),
            busy: AtomicUsize::new(0),
            pool: super::pool::pass_pool()?,
            weight_bytes: t.bytes,
            files: t.files,
        })
    }

    /// Loads a stage from a GGUF file: projections stay in the file's quantized types; the
    /// embedding, norms and biases are dequantized to f32, in which GGUF stages compute.
    fn load_gguf(
        spec: StageSpec<'_>,
        file: &GgufFile,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        let cfg = spec.config;
        spec.range.check_within(cfg.num_hidden_layers)?;
        let dev = &spec.device;
        let wanted = Self::gguf_tensor_list(&cfg, spec.range, spec.first, spec.last);
        let total: u64 = wanted.iter().map(|(n, _)| file.tensor_bytes(n)).sum();
        for (name, expected) in &wanted {
            match file.tensor_shape(name) {
                None => {
                    return Err(EngineError::MissingTensor {
                        name: name.clone(),
                        place: file.path().to_path_buf(),
                    });
                }
                Some(actual) if &actual != expected => {
                    return Err(EngineError::TensorShape {
                        path: file.path().to_path_buf(),
                        name: name.clone(),
                        expected: expected.clone(),
                        actual,
                    });
                }
                Some(_) => {}
            }
        }
        let mut r = GgufReader {
            file,
            device: dev,
            done: 0,
            total,
            held: 0,
            progress,
        };
        let eps = cfg.rms_norm_eps;
        // The embedding stays in its block format: a lookup dequantizes only the rows it
        // needs, and a tied head multiplies through the very same table.
        let tied_head = spec.last && cfg.tie_word_embeddings;
        let table = if spec.first || tied_head {
            Some(r.matrix(Format::Gguf.embed())?)
        } else {
            None
        };
        // A tied head's table in a format the CPU kernels repack is held repacked only: the
        // head multiplies it like any projection (a third of a small model's bytes), a lookup
        // puts the rows it needs back as stored.
        let packed_table = match &table {
            Some(GgufMatrix::Blocks(QMatMul::QTensor(q))) if tied_head => r.pack(q)?,
            _ => None,
        };
        let embed = match (&table, spec.first) {
            (Some(_), true) if packed_table.is_some() => {
                packed_table.clone().map(TokenEmbedding::Packed)
            }
            (Some(t), true) => Some(match t {
                GgufMatrix::Blocks(q) => TokenEmbedding::Quant(q.clone()),
                GgufMatrix::Half(w) => {
                    TokenEmbedding::Dense(Embedding::new(w.clone(), cfg.hidden_size))
                }
            }),
            _ => None,
        };
        let mut layers = Vec::with_capacity(spec.range.len());
        for i in spec.range.iter() {
            layers.push(build_layer(
                &mut r,
                &cfg,
                &LayerNames::new(&cfg, Format::Gguf, i),
            )?);
        }
        let head = if spec.last {
            let norm = RmsNorm::new(r.dense(Format::Gguf.final_norm())?, eps);
            let lm_head = match (table, packed_table) {
                (Some(_), Some(packed)) => Proj::Packed(packed, None),
                (Some(t), None) if tied_head => t.into_proj(None),
                _ => r.proj(Format::Gguf.lm_head(), None)?,
            };
            Some(Head { norm, lm_head })
        } else {
            None
        };
        let held = r.held;
        Ok(Self {
            rotary: RotaryTable::new(&cfg),
            config: cfg,
            range: spec.range,
            device: spec.device,
            dtype: DType::F32,
            act: DType::F32,
            embed,
            layers,
            head,
            caches: Mutex::new(HashMap::new()),
            busy: AtomicUsize::new(0),
            pool: super::pool::pass_pool()?,
            weight_bytes: held,
            files: vec![file.path().to_path_buf()],
        })
    }
}

/// Reads a GGUF stage's tensors one by one, counting the bytes held and reporting progress.
struct GgufReader<'a> {
    file: &'a GgufFile,
    device: &'a Device,
    done: u64,
    total: u64,
    /// Bytes the stage holds: quantized matrices at their stored size, the rest in f32.
    held: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl GgufReader<'_> {
    fn read(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        self.read_on(name, self.device)
    }

    fn read_on(&mut self, name: &str, device: &Device) -> Result<candle_core::quantized::QTensor> {
        let t = self.file.qtensor(name, device)?;
        self.done += self.file.tensor_bytes(name);
        (self.progress)(self.done, self.total);
        Ok(t)
    }

    /// A tensor dequantized to f32 (embeddings, norms, biases).
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let t = self.read(name)?.dequantize(self.device)?;
        self.held += (t.elem_count() * 4) as u64;
        Ok(t)
    }

    /// A matrix as the stage holds it, counting its bytes: in its block format; F16 and BF16
    /// ones on the CPU as half-precision tensors, which the kernels widen as they multiply
    /// (elsewhere, and F32 ones, as f32, which candle's products take).
    fn matrix(&mut self, name: &str) -> Result<GgufMatrix> {
        let q = self.read(name)?;
        self.hold(q)
    }

    /// `q` as the stage holds it (see [`Self::matrix`]), its bytes counted.
    fn hold(&mut self, q: candle_core::quantized::QTensor) -> Result<GgufMatrix> {
        use candle_core::quantized::GgmlDType;
        let half = match q.dtype() {
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        let m = match half {
            Some(dtype) if self.device.is_cpu() => GgufMatrix::Half(half_tensor(&q, dtype)?),
            _ => GgufMatrix::Blocks(QMatMul::from_qtensor(q)?),
        };
        self.held += match &m {
            GgufMatrix::Blocks(QMatMul::QTensor(t)) => t.storage_size_in_bytes() as u64,
            GgufMatrix::Blocks(QMatMul::Tensor(t) | QMatMul::TensorF16(t))
            | GgufMatrix::Half(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        };
        Ok(m)
    }

    /// Matrix `weight` kept quantized, with the named bias in f32. A matrix in a block format
    /// the CPU kernels repack is repacked for them and held only so.
    fn proj(&mut self, weight: &str, bias: Option<&str>) -> Result<Proj> {
        let w = self.matrix(weight)?;
        let b = bias.map(|name| self.dense(name)).transpose()?;
        self.projection(w, b)
    }

    /// A held matrix and its bias as the projection the stage multiplies.
    fn projection(&mut self, w: GgufMatrix, b: Option<Tensor>) -> Result<Proj> {
        if let GgufMatrix::Blocks(QMatMul::QTensor(q)) = &w
            && let Some(packed) = self.pack(q)?
        {
            return Ok(Proj::Packed(packed, b));
        }
        Ok(w.into_proj(b))
    }

    /// `q` (read by [`Self::matrix`]) repacked, where its format and shape allow, to be held
    /// instead of it.
    fn pack(&mut self, q: &candle_core::quantized::QTensor) -> Result<Option<PackedBlocks>> {
        let packed = PackedBlocks::pack(q)?;
        if let Some(p) = &packed {
            // Q3_K, Q4_K and Q5_K grow by their decoded sub-block scales (2-4%).
            self.held = self.held - q.storage_size_in_bytes() as u64 + p.len() as u64;
        }
        Ok(packed)
    }
}

/// A GGUF matrix as a stage holds it.
#[derive(Clone)]
enum GgufMatrix {
    /// In its block format (or f32).
    Blocks(QMatMul),
    /// F16 or BF16 on the CPU, kept half precision.
    Half(Tensor),
}

impl GgufMatrix {
    fn into_proj(self, bias: Option<Tensor>) -> Proj {
        match self {
            Self::Blocks(q) => Proj::Quant(q, bias),
            Self::Half(w) => Proj::Dense(Linear::new(w, bias)),
        }
    }
}

/// A GGUF F16 or BF16 tensor as a half-precision candle tensor (in CPU memory).
fn half_tensor(q: &candle_core::quantized::QTensor, dtype: DType) -> Result<Tensor> {
    Ok(match dtype {
        // F16 comes out as it is stored.
        DType::F16 => q.dequantize_f16(&Device::Cpu)?,
        // BF16 through f32 is exact.
        _ => q.dequantize(&Device::Cpu)?.to_dtype(dtype)?,
    })
}

/// A vector (a norm's weights, a bias) in the precision the stage computes in: small, and
/// added to or multiplied with activations, so kept in theirs.
fn small(t: &mut LoadedTensors, name: &str, act: DType) -> Result<Tensor> {
    Ok(t.take(name)?.to_dtype(act)?)
}

/// Where a decoder layer's tensors come from: a safetensors checkpoint or a GGUF file.
trait LayerSource {
    /// A vector (a norm's weights) as the stage computes with it.
    fn vector(&mut self, name: &str) -> Result<Tensor>;

    /// The projection whose weight is `weight`, with the named bias.
    fn proj(&mut self, weight: &str, bias: Option<&str>) -> Result<Proj>;

    /// The projections stored as one matrix `weight`, consecutive blocks of `rows` rows each
    /// (Phi-3's q/k/v and gate/up), without biases.
    fn split(&mut self, weight: &str, rows: &[usize]) -> Result<Vec<Proj>>;
}

/// The stage's tensors of a safetensors checkpoint, already read.
struct SafetensorsLayer<'a> {
    t: &'a mut LoadedTensors,
    act: DType,
}

impl LayerSource for SafetensorsLayer<'_> {
    fn vector(&mut self, name: &str) -> Result<Tensor> {
        small(self.t, name, self.act)
    }

    fn proj(&mut self, weight: &str, bias: Option<&str>) -> Result<Proj> {
        let w = self.t.take(weight)?;
        let b = bias.map(|name| self.vector(name)).transpose()?;
        Ok(Proj::Dense(Linear::new(w, b)))
    }

    fn split(&mut self, weight: &str, rows: &[usize]) -> Result<Vec<Proj>> {
        let w = self.t.take(weight)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(rows.len());
        for &n in rows {
            // A block of rows of a row-major matrix is itself contiguous: no copy.
            out.push(Proj::Dense(Linear::new(w.narrow(0, start, n)?, None)));
            start += n;
        }
        Ok(out)
    }
}

impl LayerSource for GgufReader<'_> {
    fn vector(&mut self, name: &str) -> Result<Tensor> {
        self.dense(name)
    }

    fn proj(&mut self, weight: &str, bias: Option<&str>) -> Result<Proj> {
        GgufReader::proj(self, weight, bias)
    }

    fn split(&mut self, weight: &str, rows: &[usize]) -> Result<Vec<Proj>> {
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        let q = self.read_on(weight, &Device::Cpu)?;
        let (total, width) = q.shape().dims2()?;
        if rows.iter().sum::<usize>() != total {
            return Err(EngineError::TensorShape {
                path: self.file.path().to_path_buf(),
                name: weight.to_string(),
                expected: vec![rows.iter().sum(), width],
                actual: vec![total, width],
            });
        }
        // Each row is a whole number of blocks, so a block of rows is a slice of the bytes.
        let dtype = q.dtype();
        let row_bytes = width / dtype.block_size() * dtype.type_size();
        let data = q.data()?;
        let mut start = 0;
        let mut out = Vec::with_capacity(rows.len());
        for &n in rows {
            let bytes = &data[start * row_bytes..(start + n) * row_bytes];
            let part = qtensor_from_ggml(dtype, bytes, vec![n, width], self.device)?;
            let m = self.hold(part)?;
            out.push(self.projection(m, None)?);
            start += n;
        }
        Ok(out)
    }
}

/// One decoder layer from `source`, its tensors named by `names` (the family's table).
fn build_layer(
    source: &mut dyn LayerSource,
    cfg: &ModelConfig,
    names: &LayerNames,
) -> Result<DecoderLayer> {
    let eps = cfg.rms_norm_eps;
    let need = |part: Part| {
        names.get(part).ok_or_else(|| EngineError::MissingTensor {
            name: format!("{part:?}"),
            place: format!("the {:?} family's table", cfg.family).into(),
        })
    };
    // A bias or norm the family has and this model uses.
    let optional = |part: Part| names.get(part).filter(|_| part.present(cfg));
    let norm = |source: &mut dyn LayerSource, part: Part| -> Result<RmsNorm> {
        Ok(RmsNorm::new(source.vector(&need(part)?)?, eps))
    };
    let input_layernorm = norm(source, Part::AttnNorm)?;
    let post_attention_layernorm = norm(source, Part::MlpNorm)?;
    let qk_norm = match (optional(Part::QNorm), optional(Part::KNorm)) {
        (Some(q), Some(k)) => Some((
            RmsNorm::new(source.vector(&q)?, eps),
            RmsNorm::new(source.vector(&k)?, eps),
        )),
        _ => None,
    };
    let (q_proj, k_proj, v_proj) = if names.has(Part::Qkv) {
        let rows = [cfg.q_width(), cfg.kv_width(), cfg.kv_width()];
        let [q, k, v] = parts(source.split(&need(Part::Qkv)?, &rows)?)?;
        (q, k, v)
    } else {
        (
            source.proj(&need(Part::Q)?, optional(Part::QBias).as_deref())?,
            source.proj(&need(Part::K)?, optional(Part::KBias).as_deref())?,
            source.proj(&need(Part::V)?, optional(Part::VBias).as_deref())?,
        )
    };
    let o_proj = source.proj(&need(Part::O)?, optional(Part::OBias).as_deref())?;
    let (gate_proj, up_proj) = if names.has(Part::GateUp) {
        let m = cfg.intermediate_size;
        let [gate, up] = parts(source.split(&need(Part::GateUp)?, &[m, m])?)?;
        (gate, up)
    } else {
        (
            source.proj(&need(Part::Gate)?, optional(Part::GateBias).as_deref())?,
            source.proj(&need(Part::Up)?, optional(Part::UpBias).as_deref())?,
        )
    };
    let down_proj = source.proj(&need(Part::Down)?, optional(Part::DownBias).as_deref())?;
    Ok(DecoderLayer {
        input_layernorm,
        attn: Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            qk_norm,
        },
        post_attention_layernorm,
        mlp: Mlp {
            gate_proj,
            up_proj,
            down_proj,
        },
    })
}

/// The `N` projections of a split matrix ([`LayerSource::split`] gives one per block of rows).
fn parts<const N: usize>(split: Vec<Proj>) -> Result<[Proj; N]> {
    let count = split.len();
    split.try_into().map_err(|_| {
        EngineError::InvalidRequest(format!("a fused matrix split into {count} parts, not {N}"))
    })
}
