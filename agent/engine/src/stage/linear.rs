//! Linear layers: a projection's weights and the product that suits them.
//!
//! On the CPU, dense weights go through [`matvec`](crate::matvec) for decode steps (f32) and for
//! any product of a few rows (bf16, f16): each weight row is read once for every row, half
//! precision widened a cache-sized block at a time. Larger products of half-precision weights
//! (prefill chunks) widen a block of weight rows at a time and multiply it with candle's general
//! product, so that no product holds more than [`WIDEN_BLOCK_BYTES`] of widened weights (candle's
//! own bf16 product widens the whole matrix, every time). Weights in GGUF's block formats go
//! through [`qmatvec`](crate::qmatvec), prefill included (Q2_K and Q3_K only where repacked).
//! Everything else (GPUs, f32 prefill, Q2_K and Q3_K matrices of shapes that do not repack)
//! takes candle's products.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;
use half::{bf16, f16};

use crate::error::Result;

/// A projection's weights: dense (safetensors, in the stage's dtype) or quantized (GGUF, in the
/// file's block format, multiplied without dequantizing the whole matrix; in CPU memory
/// repacked eight rows at a time where the format allows, see
/// [`qmatvec::packed`](crate::qmatvec::packed)).
pub(super) enum Proj {
    Dense(Linear),
    Quant(QMatMul, Option<Tensor>),
    Packed(PackedBlocks, Option<Tensor>),
}

/// A matrix in a block format (Q4_0 to Q8_0, Q2_K to Q6_K) in CPU memory as
/// [`qmatvec::packed`](crate::qmatvec::packed) multiplies it: the file's bytes rearranged (the
/// sub-block scales of Q3_K, Q4_K and Q5_K decoded), held instead of them.
#[derive(Clone)]
pub(super) struct PackedBlocks {
    dtype: candle_core::quantized::GgmlDType,
    format: crate::qmatvec::Format,
    /// Shared where a tied table is both the embedding and the head.
    bytes: std::sync::Arc<Vec<u8>>,
    outputs: usize,
    width: usize,
}

impl PackedBlocks {
    /// `q` packed, where it is in a format and of a shape the kernel takes on this CPU; `None`
    /// otherwise.
    pub(super) fn pack(q: &candle_core::quantized::QTensor) -> Result<Option<Self>> {
        use crate::qmatvec::Format;
        use crate::qmatvec::packed::{pack, packs};
        let Some(format) = Format::of(q.dtype()) else {
            return Ok(None);
        };
        let (outputs, width) = q.shape().dims2()?;
        if !q.device().is_cpu() || !packs(format, outputs, width) {
            return Ok(None);
        }
        let data = q.data()?;
        Ok(pack(format, &data, width).map(|bytes| Self {
            dtype: q.dtype(),
            format,
            bytes: std::sync::Arc::new(bytes),
            outputs,
            width,
        }))
    }

    /// The rows of `ids` (any shape), dequantized: `ids`' shape with `width` added. Each row
    /// is put back as the file stores it and dequantized by candle, as a table held in its
    /// block format would be.
    pub(super) fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        use crate::qmatvec::packed::{stored_row, stored_row_bytes};
        let flat = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut raw = Vec::with_capacity(flat.len() * stored_row_bytes(self.format, self.width));
        for &id in &flat {
            if id as usize >= self.outputs {
                return Err(candle_core::Error::Msg(format!(
                    "token id {id} is past the embedding table's {} rows",
                    self.outputs
                ))
                .into());
            }
            stored_row(self.format, &self.bytes, self.width, id as usize, &mut raw);
        }
        let rows = candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            &raw,
            vec![flat.len(), self.width],
            &candle_core::Device::Cpu,
        )?
        .dequantize(&candle_core::Device::Cpu)?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.width);
        Ok(rows.reshape(shape)?)
    }

    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// `x · wᵀ (+ bias)` for `x` of shape `(b, len, width)` on the CPU, [`MAX_ROWS`] rows at a
    /// time; `x` in another float type is multiplied in f32 and the result given back in it.
    ///
    /// [`MAX_ROWS`]: crate::qmatvec::MAX_ROWS
    fn forward(&self, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
        use crate::qmatvec::packed::rows_times_packed;
        let width = x.dim(2)?;
        if width != self.width || !x.device().is_cpu() {
            return Err(candle_core::Error::Msg(format!(
                "a packed {:?} matrix of width {} on the CPU was given {:?} on {:?}",
                self.format,
                self.width,
                x.dims(),
                x.device().location()
            ))
            .into());
        }
        let dtype = x.dtype();
        let product = |xs: &[f32], out: &mut [f32]| {
            rows_times_packed(self.format, xs, xs.len() / width, &self.bytes, width, out)
        };
        let Some(y) = rows_on_cpu(&x.to_dtype(DType::F32)?, self.outputs, bias, product)? else {
            return Err(candle_core::Error::Msg(
                "an f32 CPU tensor did not give its elements".into(),
            )
            .into());
        };
        Ok(y.to_dtype(dtype)?)
    }
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
        Proj::Packed(w, bias) => return w.forward(bias.as_ref(), x),
        Proj::Quant(w, bias) => {
            // F32, F16 and BF16 files are held as plain f32 matrices (candle dequantizes them).
            if let QMatMul::Tensor(t) = w
                && let Some(y) = decode_on_cpu(t, bias.as_ref(), x)?
            {
                return Ok(y);
            }
            if let QMatMul::QTensor(q) = w
                && let Some(y) = blocks_on_cpu(q, bias.as_ref(), x)?
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
    if let Some(y) = half_on_cpu(lin.weight(), lin.bias(), x)? {
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

/// A product against a matrix in one of the block formats [`qmatvec`](crate::qmatvec)
/// multiplies, in CPU memory, through that kernel, [`qmatvec::MAX_ROWS`](crate::qmatvec::MAX_ROWS)
/// rows at a time (a prefill chunk reads the weights once per 16 rows); `None` for anything else
/// (other formats, GPU tensors), which takes candle's product. Every product of these formats
/// goes here, prefill included: candle's first product of a Q4_K, Q6_K or (on VNNI CPUs) Q8_0
/// matrix makes a second, repacked copy of it that the stage would then hold beside the first.
fn blocks_on_cpu(
    w: &candle_core::quantized::QTensor,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    use crate::qmatvec::{Format, rows_times_blocks, supports};
    let width = x.dim(2)?;
    let Some(format) = Format::of(w.dtype()) else {
        return Ok(None);
    };
    let (outputs, w_width) = w.shape().dims2()?;
    if w_width != width
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || !w.device().is_cpu()
        || !supports(format, outputs, width)
    {
        return Ok(None);
    }
    let bytes = w.data()?;
    rows_on_cpu(x, outputs, bias, |xs, out| {
        rows_times_blocks(format, xs, xs.len() / width, &bytes, width, out)
    })
}

/// `x · wᵀ (+ bias)` for an f32 CPU tensor `x` of shape `(b, len, width)` through a block kernel:
/// `product(xs, out)` multiplies rows of `x` ([`MAX_ROWS`](crate::qmatvec::MAX_ROWS) at most)
/// into `outputs` columns each. `None` when `x`'s elements are not f32 in CPU memory.
fn rows_on_cpu(
    x: &Tensor,
    outputs: usize,
    bias: Option<&Tensor>,
    product: impl Fn(&[f32], &mut [f32]),
) -> Result<Option<Tensor>> {
    use crate::qmatvec::MAX_ROWS;
    let (b, len, width) = x.dims3()?;
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * len * outputs];
    {
        let (x_storage, x_layout) = x.storage_and_layout();
        let Some(xs) = cpu_f32(&x_storage, x_layout) else {
            return Ok(None);
        };
        for (xs, out) in xs
            .chunks(MAX_ROWS * width)
            .zip(out.chunks_mut(MAX_ROWS * outputs))
        {
            product(xs, out);
        }
    }
    let y = Tensor::from_vec(out, (b, len, outputs), x.device())?;
    Ok(Some(match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    }))
}

/// Rows up to which a product of half-precision weights goes through the kernel, which reads
/// the weights once whatever the rows but multiplies at a fraction of a general product's speed;
/// past it, a general product over widened blocks is faster.
pub(super) const HALF_KERNEL_ROWS: usize = 16;

/// The most widened (f32) weights a product of half-precision weights holds at once, beside its
/// output: a block of weight rows this large, widened just before it is multiplied.
pub(super) const WIDEN_BLOCK_BYTES: usize = 4 << 20;

/// A weight matrix in CPU memory, as the kernel reads it.
enum WeightSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A contiguous CPU tensor's elements in a format the kernel reads; `None` for any other.
fn cpu_weights<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<WeightSlice<'a>> {
    use candle_core::{CpuStorage, Storage};
    let (start, end) = layout.contiguous_offsets()?;
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.get(start..end).map(WeightSlice::F32),
        Storage::Cpu(CpuStorage::BF16(v)) => v.get(start..end).map(WeightSlice::Bf16),
        Storage::Cpu(CpuStorage::F16(v)) => v.get(start..end).map(WeightSlice::F16),
        _ => None,
    }
}

/// `x · wᵀ (+ bias)` through [`matvec`](crate::matvec) for `x` of shape `(b, len, width)` in f32
/// and `w` an `(outputs, width)` f32, bf16 or f16 matrix in CPU memory; `None` when they are not.
fn kernel(w: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Result<Option<Tensor>> {
    let (b, len, width) = x.dims3()?;
    if !w.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (outputs, w_width) = w.dims2()?;
    if w_width != width {
        // candle's product reports the mismatch with both shapes.
        return Ok(None);
    }
    let rows = b * len;
    // Attention's output comes transposed; the kernel reads rows in place.
    let x = x.contiguous()?;
    let mut out = vec![0f32; rows * outputs];
    {
        let (w_storage, w_layout) = w.storage_and_layout();
        let (x_storage, x_layout) = x.storage_and_layout();
        let (Some(w), Some(xs)) = (
            cpu_weights(&w_storage, w_layout),
            cpu_f32(&x_storage, x_layout),
        ) else {
            return Ok(None);
        };
        use crate::matvec::rows_times_weights;
        match w {
            WeightSlice::F32(w) => rows_times_weights(xs, rows, w, width, &mut out),
            WeightSlice::Bf16(w) => rows_times_weights(xs, rows, w, width, &mut out),
            WeightSlice::F16(w) => rows_times_weights(xs, rows, w, width, &mut out),
        }
    }
    let y = Tensor::from_vec(out, (b, len, outputs), x.device())?;
    Ok(Some(match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    }))
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
    if x.dim(1)? != 1 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    kernel(w, bias, x)
}

/// Half-precision (bf16, f16) weights in CPU memory against f32 inputs: up to
/// [`HALF_KERNEL_ROWS`] rows through the kernel (a sequence decoded alone or batched gets the
/// same bits, as with f32); more as a general product over blocks of widened weight rows.
/// `None` for other weights or inputs.
fn half_on_cpu(w: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Result<Option<Tensor>> {
    if !matches!(w.dtype(), DType::BF16 | DType::F16)
        || !w.device().is_cpu()
        || x.dtype() != DType::F32
    {
        return Ok(None);
    }
    let (b, len, width) = x.dims3()?;
    let rows = b * len;
    if rows <= HALF_KERNEL_ROWS {
        return kernel(w, bias, x);
    }
    let (outputs, w_width) = w.dims2()?;
    if w_width != width {
        return Ok(None);
    }
    let x = x.reshape((rows, width))?;
    let block = (WIDEN_BLOCK_BYTES / (width * 4)).max(1);
    let mut parts = Vec::with_capacity(outputs.div_ceil(block));
    let mut first = 0;
    while first < outputs {
        let n = block.min(outputs - first);
        // Only the block's rows are widened: candle converts what the view covers.
        let widened = w.narrow(0, first, n)?.to_dtype(DType::F32)?;
        parts.push(x.matmul(&widened.t()?)?);
        first += n;
    }
    let y = Tensor::cat(&parts, 1)?.reshape((b, len, outputs))?;
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
