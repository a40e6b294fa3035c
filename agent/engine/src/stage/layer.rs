//! The decoder layer: attention (projections, rotary embedding, the cache, the scores) and the
//! MLP, for one sequence's chunk or one position of each of several sequences.

use candle_core::{DType, Module, Tensor};
use candle_nn::RmsNorm;

use super::kv::LayerKv;
use super::linear::{Proj, cpu_f32, heads_f32, linear};
use crate::config::ModelConfig;
use crate::error::Result;

pub(super) struct Attention {
    pub(super) q_proj: Proj,
    pub(super) k_proj: Proj,
    pub(super) v_proj: Proj,
    pub(super) o_proj: Proj,
    /// Qwen3 normalises each head of q and k before RoPE.
    pub(super) qk_norm: Option<(RmsNorm, RmsNorm)>,
}

pub(super) struct Mlp {
    pub(super) gate_proj: Proj,
    pub(super) up_proj: Proj,
    pub(super) down_proj: Proj,
}

pub(super) struct DecoderLayer {
    pub(super) input_layernorm: RmsNorm,
    pub(super) attn: Attention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
}

impl DecoderLayer {
    /// Runs the layer for `n` sequences at once: `x` is `(n, len, hidden)` (one sequence's chunk,
    /// or one position of each of several sequences), `cos`/`sin` are `(len, head_dim / 2)` or
    /// `(n, len, head_dim / 2)`, and `masks[i]`, `kvs[i]` are sequence i's mask and cache.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
        masks: &[Option<Tensor>],
        kvs: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let (q, k, v) = self.attn.project(&h, cfg, cos, sin)?;
        let mut ys = Vec::with_capacity(kvs.len());
        for (i, kv) in kvs.iter_mut().enumerate() {
            let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            ys.push(
                self.attn
                    .attend(&qi, &ki, &vi, cfg, masks[i].as_ref(), kv)?,
            );
        }
        let y = Tensor::cat(&ys, 0)?;
        let h = self.attn.output(&y, cfg)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        Ok((x + h)?)
    }
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&linear(&self.gate_proj, x)?)?;
        let up = linear(&self.up_proj, x)?;
        linear(&self.down_proj, &(gate * up)?)
    }
}

impl Attention {
    /// Projects `x` `(b, len, hidden)` to rotated queries and keys and to values, each
    /// `(b, heads, len, head_dim)`.
    fn project(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, len, _) = x.dims3()?;
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let q = linear(&self.q_proj, x)?.reshape((b, len, heads, d))?;
        let k = linear(&self.k_proj, x)?.reshape((b, len, kv_heads, d))?;
        let v = linear(&self.v_proj, x)?.reshape((b, len, kv_heads, d))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?;
        let rope = if cfg.rope_interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// One sequence's attention: appends its new keys and values to its cache and attends over
    /// all of them. Returns `(1, heads, len, head_dim)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
        mask: Option<&Tensor>,
        kv: &mut LayerKv,
    ) -> Result<Tensor> {
        let (k, v) = kv.append(k, v)?;
        let dense = matches!(self.o_proj, Proj::Dense(_));
        // A decode step of an f32 stage on the CPU: one pass over the cache per group of heads.
        // GGUF stages too: candle's path below copies the whole cache every step (repeat_kv,
        // then contiguous), which cost an 8-layer Q4_K stage 37 ms a step at 1500 cached
        // positions against 8 ms here, and the oracle tests still give candle-transformers'
        // quantized models' logits within their bounds (1e-4 for Q4_1, Q5_0 and Q5_1).
        if mask.is_none()
            && q.dim(2)? == 1
            && q.device().is_cpu()
            && q.dtype() == DType::F32
            && k.dtype() == DType::F32
            && let Some(y) = Self::attend_decode_cpu(q, &k, &v, cfg)?
        {
            return Ok(y);
        }
        if cfg.numerics.quantized_flash_attention && q.device().is_cpu() && !dense {
            return Self::attend_cpu_flash(q, &k.contiguous()?, &v.contiguous()?, cfg);
        }
        let groups = cfg.num_attention_heads / cfg.num_key_value_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        // Scores and softmax in f32 whatever the weights' precision: bf16 softmax loses tokens.
        let in_dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        // Some references divide by √d and others multiply by 1/√d; the results differ in the
        // last bit, which quantized matmuls (that round their inputs to 8 bits) can turn into
        // visible differences, so each family follows its reference.
        let raw = q.matmul(&k.t()?)?;
        let mut scores = if cfg.numerics.divide_scores {
            (raw / (cfg.head_dim as f64).sqrt())?
        } else {
            (raw * (1.0 / (cfg.head_dim as f64).sqrt()))?
        };
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?.to_dtype(in_dtype)?)
    }

    /// One position's attention over the whole cache through
    /// [`decode_attention`](crate::matvec::decode_attention), reading the cache in place: candle's
    /// path copies the keys and values per head and multiplies one row at a time, which at 1500
    /// cached positions was half of a decode step. `None` when a tensor is not in CPU memory as
    /// f32. Returns `(1, heads, 1, head_dim)`.
    fn attend_decode_cpu(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
    ) -> Result<Option<Tensor>> {
        use crate::matvec::{HeadBlocks, ScoreScale, decode_attention};
        let (_, heads, _, d) = q.dims4()?;
        let (_, kv_heads, len, _) = k.dims4()?;
        let q = q.contiguous()?;
        let sqrt = (d as f64).sqrt();
        let scale = if cfg.numerics.divide_scores {
            ScoreScale::Divide(sqrt as f32)
        } else {
            ScoreScale::Multiply((1.0 / sqrt) as f32)
        };
        let mut out = vec![0f32; heads * d];
        {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (Some(q), Some((k, k_stride)), Some((v, v_stride))) =
                (cpu_f32(&qs, ql), heads_f32(&ks, kl), heads_f32(&vs, vl))
            else {
                return Ok(None);
            };
            if k_stride != v_stride {
                return Ok(None);
            }
            let cache = HeadBlocks {
                k,
                v,
                stride: k_stride,
                len,
            };
            decode_attention(q, cache, heads, kv_heads, d, scale, &mut out);
        }
        Ok(Some(Tensor::from_vec(out, (1, heads, 1, d), q.device())?))
    }

    /// Quantized stages on the CPU of a family whose reference attends so (Qwen3, see
    /// [`Numerics`](crate::family::Numerics)): candle's fused flash-attention kernel, causal from
    /// the chunk's offset, grouped-query heads handled inside. Their references (candle-transformers'
    /// Qwen3, whole and quantized) use it on the CPU, and its online softmax rounds differently
    /// from the plain path: with quantized matmuls, which round their inputs to 8 bits, that
    /// rounding must match. Dense stages only need agreement within 1e-5 and take the faster
    /// paths: on the 8-layer Qwen3-shaped model at 1500 positions this kernel decoded 27 tokens/s
    /// against 103-110, and prefilled 300 tokens/s against 500-540. Returns
    /// `(1, heads, len, head_dim)`.
    fn attend_cpu_flash(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
        use candle_nn::attention::cpu_flash::causal::causal_decode_f32_interleaved;
        use candle_nn::attention::{AttnMask, flash_attn};
        let len = q.dim(2)?;
        let kv_len = k.dim(2)?;
        let offset = kv_len - len;
        let in_dtype = q.dtype();
        if len == 1 && in_dtype == DType::F32 {
            // The references decode one position with a dedicated kernel over keys and values
            // interleaved per position, `(positions, kv_heads, 2 * head_dim)`.
            let (heads, kv_heads, d) = (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            );
            let q_flat: Vec<f32> = q.flatten_all()?.to_vec1()?;
            let kv = Tensor::cat(
                &[
                    k.squeeze(0)?.transpose(0, 1)?,
                    v.squeeze(0)?.transpose(0, 1)?,
                ],
                2,
            )?;
            let kv_flat: Vec<f32> = kv.flatten_all()?.to_vec1()?;
            let scale = 1.0 / (d as f32).sqrt();
            let y = causal_decode_f32_interleaved(
                &q_flat, &kv_flat, heads, kv_heads, d, kv_len, scale,
            )?;
            return Ok(y.unsqueeze(0)?);
        }
        let prep = |t: &Tensor| -> Result<Tensor> {
            Ok(t.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?)
        };
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let y = flash_attn::<f32>(
            &prep(q)?,
            &prep(k)?,
            &prep(v)?,
            scale,
            AttnMask::causal_with_offset(offset),
            None,
            None,
        )?;
        Ok(y.to_dtype(in_dtype)?)
    }

    /// Merges the heads of `y` `(b, heads, len, head_dim)` and applies the output projection.
    fn output(&self, y: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
        let (b, _, len, _) = y.dims4()?;
        let y = y.transpose(1, 2)?.reshape((b, len, cfg.q_width()))?;
        linear(&self.o_proj, &y)
    }
}
