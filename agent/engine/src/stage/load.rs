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
use super::{Head, Stage, StageSpec, TokenEmbedding, layer_prefix};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::rope::RotaryTable;
use crate::weights::{LoadedTensors, WeightFiles, Weights};

impl Stage {
    /// Names and shapes of the tensors a stage with this spec reads.
    pub fn tensor_list(
        cfg: &ModelConfig,
        range: LayerRange,
        first: bool,
        last: bool,
    ) -> Vec<(String, Vec<usize>)> {
        let h = cfg.hidden_size;
        let mut list: Vec<(String, Vec<usize>)> = Vec::new();
        let embed = (
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
        );
        if first || (last && cfg.tie_word_embeddings) {
            list.push(embed);
        }
        for i in range.iter() {
            let p = layer_prefix(i);
            let mut add = |name: &str, shape: Vec<usize>| list.push((format!("{p}.{name}"), shape));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            add("self_attn.q_proj.weight", vec![cfg.q_width(), h]);
            add("self_attn.k_proj.weight", vec![cfg.kv_width(), h]);
            add("self_attn.v_proj.weight", vec![cfg.kv_width(), h]);
            add("self_attn.o_proj.weight", vec![h, cfg.q_width()]);
            if cfg.qkv_bias {
                add("self_attn.q_proj.bias", vec![cfg.q_width()]);
                add("self_attn.k_proj.bias", vec![cfg.kv_width()]);
                add("self_attn.v_proj.bias", vec![cfg.kv_width()]);
            }
            if cfg.o_bias {
                add("self_attn.o_proj.bias", vec![h]);
            }
            if cfg.qk_norm {
                add("self_attn.q_norm.weight", vec![cfg.head_dim]);
                add("self_attn.k_norm.weight", vec![cfg.head_dim]);
            }
            let m = cfg.intermediate_size;
            add("mlp.gate_proj.weight", vec![m, h]);
            add("mlp.up_proj.weight", vec![m, h]);
            add("mlp.down_proj.weight", vec![h, m]);
            if cfg.mlp_bias {
                add("mlp.gate_proj.bias", vec![m]);
                add("mlp.up_proj.bias", vec![m]);
                add("mlp.down_proj.bias", vec![h]);
            }
        }
        if last {
            list.push(("model.norm.weight".to_string(), vec![h]));
            if !cfg.tie_word_embeddings {
                list.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
            }
        }
        list
    }

    /// Names and shapes of the tensors a GGUF stage with this spec reads: the same tensors as
    /// [`Stage::tensor_list`], under llama.cpp's names.
    pub fn gguf_tensor_list(
        cfg: &ModelConfig,
        range: LayerRange,
        first: bool,
        last: bool,
    ) -> Vec<(String, Vec<usize>)> {
        // The same tensors as a safetensors stage, under llama.cpp's names.
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
        let tied_head = last && cfg.tie_word_embeddings;
        if first || tied_head {
            wanted.push(("token_embd.weight".into(), vec![cfg.vocab_size, h]));
        }
        for i in range.iter() {
            let p = format!("blk.{i}");
            let mut add = |n: &str, shape: Vec<usize>| wanted.push((format!("{p}.{n}"), shape));
            add("attn_norm.weight", vec![h]);
            add("ffn_norm.weight", vec![h]);
            add("attn_q.weight", vec![cfg.q_width(), h]);
            add("attn_k.weight", vec![cfg.kv_width(), h]);
            add("attn_v.weight", vec![cfg.kv_width(), h]);
            add("attn_output.weight", vec![h, cfg.q_width()]);
            if cfg.qkv_bias {
                add("attn_q.bias", vec![cfg.q_width()]);
                add("attn_k.bias", vec![cfg.kv_width()]);
                add("attn_v.bias", vec![cfg.kv_width()]);
            }
            if cfg.qk_norm {
                add("attn_q_norm.weight", vec![cfg.head_dim]);
                add("attn_k_norm.weight", vec![cfg.head_dim]);
            }
            add("ffn_gate.weight", vec![m, h]);
            add("ffn_up.weight", vec![m, h]);
            add("ffn_down.weight", vec![h, m]);
        }
        if last {
            wanted.push(("output_norm.weight".into(), vec![h]));
            if !cfg.tie_word_embeddings {
                wanted.push(("output.weight".into(), vec![cfg.vocab_size, h]));
            }
        }
        wanted
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
        let embed_weight = if spec.first || (spec.last && cfg.tie_word_embeddings) {
            Some(t.take("model.embed_tokens.weight")?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.range.len());
        for i in spec.range.iter() {
            layers.push(load_layer(&mut t, &cfg, &layer_prefix(i), act)?);
        }
        let head = if spec.last {
            let lm_weight = match (&embed_weight, cfg.tie_word_embeddings) {
                (Some(w), true) => w.clone(),
                _ => t.take("lm_head.weight")?,
            };
            Some(Head {
                norm: RmsNorm::new(small(&mut t, "model.norm.weight", act)?, eps),
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
            pool: super::pass_pool()?,
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
            Some(r.matrix("token_embd.weight")?)
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
            let p = format!("blk.{i}");
            let qk_norm = if cfg.qk_norm {
                Some((
                    RmsNorm::new(r.dense(&format!("{p}.attn_q_norm.weight"))?, eps),
                    RmsNorm::new(r.dense(&format!("{p}.attn_k_norm.weight"))?, eps),
                ))
            } else {
                None
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::new(r.dense(&format!("{p}.attn_norm.weight"))?, eps),
                attn: Attention {
                    q_proj: r.proj(&format!("{p}.attn_q"), cfg.qkv_bias)?,
                    k_proj: r.proj(&format!("{p}.attn_k"), cfg.qkv_bias)?,
                    v_proj: r.proj(&format!("{p}.attn_v"), cfg.qkv_bias)?,
                    o_proj: r.proj(&format!("{p}.attn_output"), cfg.o_bias)?,
                    qk_norm,
                },
                post_attention_layernorm: RmsNorm::new(
                    r.dense(&format!("{p}.ffn_norm.weight"))?,
                    eps,
                ),
                mlp: Mlp {
                    gate_proj: r.proj(&format!("{p}.ffn_gate"), false)?,
                    up_proj: r.proj(&format!("{p}.ffn_up"), false)?,
                    down_proj: r.proj(&format!("{p}.ffn_down"), false)?,
                },
            });
        }
        let head = if spec.last {
            let norm = RmsNorm::new(r.dense("output_norm.weight")?, eps);
            let lm_head = match (table, packed_table) {
                (Some(_), Some(packed)) => Proj::Packed(packed, None),
                (Some(t), None) if tied_head => t.into_proj(None),
                _ => r.proj("output", false)?,
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
            pool: super::pass_pool()?,
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
        let t = self.file.qtensor(name, self.device)?;
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
        use candle_core::quantized::GgmlDType;
        let q = self.read(name)?;
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

    /// `{prefix}.weight` kept quantized, with `{prefix}.bias` in f32 when `bias`. A matrix in a
    /// block format the CPU kernels repack is repacked for them and held only so.
    fn proj(&mut self, prefix: &str, bias: bool) -> Result<Proj> {
        let w = self.matrix(&format!("{prefix}.weight"))?;
        let b = if bias {
            Some(self.dense(&format!("{prefix}.bias"))?)
        } else {
            None
        };
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

fn load_linear(t: &mut LoadedTensors, prefix: &str, bias: bool, act: DType) -> Result<Proj> {
    let w = t.take(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(small(t, &format!("{prefix}.bias"), act)?)
    } else {
        None
    };
    Ok(Proj::Dense(Linear::new(w, b)))
}

fn load_layer(
    t: &mut LoadedTensors,
    cfg: &ModelConfig,
    p: &str,
    act: DType,
) -> Result<DecoderLayer> {
    let eps = cfg.rms_norm_eps;
    let a = format!("{p}.self_attn");
    let qk_norm = if cfg.qk_norm {
        Some((
            RmsNorm::new(small(t, &format!("{a}.q_norm.weight"), act)?, eps),
            RmsNorm::new(small(t, &format!("{a}.k_norm.weight"), act)?, eps),
        ))
    } else {
        None
    };
    Ok(DecoderLayer {
        input_layernorm: RmsNorm::new(small(t, &format!("{p}.input_layernorm.weight"), act)?, eps),
        post_attention_layernorm: RmsNorm::new(
            small(t, &format!("{p}.post_attention_layernorm.weight"), act)?,
            eps,
        ),
        attn: Attention {
            q_proj: load_linear(t, &format!("{a}.q_proj"), cfg.qkv_bias, act)?,
            k_proj: load_linear(t, &format!("{a}.k_proj"), cfg.qkv_bias, act)?,
            v_proj: load_linear(t, &format!("{a}.v_proj"), cfg.qkv_bias, act)?,
            o_proj: load_linear(t, &format!("{a}.o_proj"), cfg.o_bias, act)?,
            qk_norm,
        },
        mlp: Mlp {
            gate_proj: load_linear(t, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias, act)?,
            up_proj: load_linear(t, &format!("{p}.mlp.up_proj"), cfg.mlp_bias, act)?,
            down_proj: load_linear(t, &format!("{p}.mlp.down_proj"), cfg.mlp_bias, act)?,
        },
    })
}
