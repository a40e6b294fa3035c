//! Linear layers: a projection's weights and the product that suits them (our decode kernel on
//! the CPU, candle's products elsewhere).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;

use crate::error::Result;

/// A projection's weights: dense (safetensors, in the stage's dtype) or quantized (GGUF, in the
/// file's block format, multiplied without dequantizing the whole matrix).
pub(super) enum Proj {
    Dense(Linear),
    Quant(QMatMul, Option<Tensor>),
}

/// Where [`decode_on_cpu`] does not apply (GPU tensors, other dtypes), decode batches at least
/// this large multiply as `W · Xᵀ` (one pass over the weights, a general matrix product);
/// smaller ones run one matrix-vector product per row, which re-reads the weights from cache
/// rather than memory. Measured on x86 with candle's gemm: a 2-row general product costs almost
/// 3 matrix-vector products, while 2 rows one by one cost 1.45.
pub(super) const ROWS_AS_GEMM: usize = 5;

/// `lin(x)` for `x` of shape `(b, len, in)`. A decode batch (`len == 1`, several sequences)
/// avoids the general product that small batches would otherwise get.
pub(super) fn linear(proj: &Proj, x: &Tensor) -> Result<Tensor> {
    let lin = match proj {
        Proj::Dense(lin) => lin,
        Proj::Quant(w, bias) => {
            // F32, F16 and BF16 files are held as plain f32 matrices (candle dequantizes them).
            if let QMatMul::Tensor(t) = w
                && let Some(y) = decode_on_cpu(t, bias.as_ref(), x)?
            {
                return Ok(y);
            }
            let (b, len, _) = x.dims3()?;
            // A small decode batch goes row by row: candle picks other kernels for several rows
            // of some block formats, whose last bits differ from one row's (and 8-bit rounding
            // of the next input can make that visible); the weights stay in cache meanwhile.
            let y = if len == 1 && b > 1 && b < ROWS_AS_GEMM {
                let rows = (0..b)
                    .map(|i| w.forward(&x.narrow(0, i, 1)?))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            } else {
                w.forward(x)?
            };
            return Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
    };
    if let Some(y) = decode_on_cpu(lin.weight(), lin.bias(), x)? {
        return Ok(y);
    }
    let (b, len, width) = x.dims3()?;
    if len != 1 || b == 1 {
        return Ok(lin.forward(x)?);
    }
    if b < ROWS_AS_GEMM {
        let rows = (0..b)
            .map(|i| lin.forward(&x.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&rows, 0)?);
    }
    let xt = x.reshape((b, width))?.t()?.contiguous()?;
    let y = lin.weight().matmul(&xt)?.t()?;
    let y = match lin.bias() {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    Ok(y.contiguous()?.unsqueeze(1)?)
}

/// A decode step (`len == 1`, any number of sequences) against f32 weights in CPU memory (an
/// f32 checkpoint's, or a GGUF file's F32, F16 and BF16 tensors, which candle holds as f32),
/// through [`matvec`](crate::matvec): each weight row is read once for the whole batch, and a
/// sequence's result has the same bits whichever batch it came in. `None` for anything else
/// (prefill chunks, other dtypes, GPU tensors), which takes candle's products.
pub(super) fn decode_on_cpu(
    w: &Tensor,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    let (b, len, width) = x.dims3()?;
    if len != 1 || !w.device().is_cpu() || w.dtype() != DType::F32 || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (outputs, w_width) = w.dims2()?;
    if w_width != width {
        // candle's product reports the mismatch with both shapes.
        return Ok(None);
    }
    // Attention's output comes transposed; the kernel reads rows in place.
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * outputs];
    {
        let (w_storage, w_layout) = w.storage_and_layout();
        let (x_storage, x_layout) = x.storage_and_layout();
        let (Some(w), Some(xs)) = (cpu_f32(&w_storage, w_layout), cpu_f32(&x_storage, x_layout))
        else {
            return Ok(None);
        };
        crate::matvec::rows_times_weights(xs, b, w, width, &mut out);
    }
    let y = Tensor::from_vec(out, (b, 1, outputs), x.device())?;
    Ok(Some(match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    }))
}

/// A contiguous f32 CPU tensor's elements, from its storage and layout; `None` for any other.
pub(super) fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets()?;
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.get(start..end),
        _ => None,
    }
}

/// The elements of an f32 CPU tensor `(1, heads, len, head_dim)` whose heads are each one
/// contiguous block (a [`LayerKv`] view), from the first head's start, with the distance
/// between heads; `None` for any other tensor.
pub(super) fn heads_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<(&'a [f32], usize)> {
    let (&[1, _, len, d], &[_, head_stride, row_stride, 1]) = (layout.dims(), layout.stride())
    else {
        return None;
    };
    if row_stride != d || head_stride < len * d {
        return None;
    }
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            v.get(layout.start_offset()..).map(|s| (s, head_stride))
        }
        _ => None,
    }
}
