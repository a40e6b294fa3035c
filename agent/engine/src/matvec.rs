//! Decode-step products `x · Wᵀ` for a few rows at once, reading each weight row once.
//!
//! A decode step multiplies one row per sequence by every weight matrix of the stage. The
//! matrices come from memory, so the cost is the bytes read: one row costs one pass over the
//! weights, and so should four. candle's general product packs the weights before multiplying
//! (a second pass over them) and one matrix-vector product per row reads them once per row;
//! measured on x86 (`examples/small_batch_matmul.rs`), 4 rows cost 2.3 times one row that way.
//! Here every weight row is loaded once and multiplied by all the input rows while it is in
//! registers.
//!
//! A row's result does not depend on how many rows travel with it: every row takes the same
//! operations in the same order whatever the batch, so a sequence decoded alone and the same
//! sequence decoded beside others get bit-identical logits. Tests and users rely on that: the
//! ring batches whichever sequences are ready, the one-process engine does not.
//!
//! Weights may be f32, bf16 or f16 ([`WeightElem`]). Half-precision weights are widened to f32
//! one cache-sized block at a time, as the block is about to be used, into a buffer each thread
//! keeps: the matrix stays in half precision in memory (half the bytes to read per step, half
//! the memory per stage), and no product ever holds a whole widened copy of it. Widening is
//! exact, so a half-precision row takes the same steps as the f32 row it widens to.

use std::cell::RefCell;

use half::{bf16, f16};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

mod attention;
mod f16c;

pub use self::attention::{HeadBlocks, ScoreScale, decode_attention};

/// Input rows multiplied together per pass over a weight row; enough to keep the floating
/// point units busy, few enough that the accumulators stay in registers.
const ROW_GROUP: usize = 4;

/// Input rows taken together stay within this many bytes, so that they stay in a 32 KiB L1
/// cache while weights stream past: four rows of 768 floats go together, of 2048 two at a time.
const INPUT_BYTES: usize = 16 << 10;

/// Weight rows are taken in blocks of about this many bytes, which stay in the L2 cache while
/// each group of input rows passes over them: the block comes from memory once whatever the
/// number of groups, and in order, which is how memory is fastest to read.
const WEIGHT_BYTES: usize = 256 << 10;

/// Input rows of `width` taken together against each weight row: as many as fit
/// [`INPUT_BYTES`], at most [`ROW_GROUP`].
fn input_group(width: usize) -> usize {
    (INPUT_BYTES / (width * std::mem::size_of::<f32>())).clamp(1, ROW_GROUP)
}

/// Weight rows of `width` values of `value_bytes` each in one block of about [`WEIGHT_BYTES`].
fn weight_block(width: usize, value_bytes: usize) -> usize {
    (WEIGHT_BYTES / (width * value_bytes)).max(1)
}

/// The least weights per parallel task, in floats (128 KiB): handing a task to rayon's pool and
/// waiting for it costs microseconds, reading this much from memory about ten. A small matrix
/// (a toy model's) is one task, done on the caller's thread.
const MIN_TASK_FLOATS: usize = 1 << 15;

/// A weight element the kernels read: f32 as it is, bf16 and f16 widened to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// The elements as f32, when they already are.
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
    /// The elements two by two as 32-bit words, when [`PairBlock`] can widen them in registers
    /// (bf16 and f16 in little-endian memory aligned to 4 bytes); `None` otherwise.
    fn as_pairs(_src: &[Self]) -> Option<Pairs<'_>> {
        None
    }
    /// Writes `src` widened to f32 into `dst` (of the same length). Implementations are
    /// `#[inline(always)]`, so that the loop is compiled with the vector instructions of the
    /// product that calls it.
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl WeightElem for f32 {
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

/// Half-precision weights as words of two elements each, by format.
pub enum Pairs<'a> {
    /// bf16 pairs.
    Bf16(&'a [u32]),
    /// f16 pairs.
    F16(&'a [u32]),
}

/// A half-precision format whose words of two [`PairBlock`] widens in registers.
pub trait PairWiden: 'static {
    /// A vector of words of two, widened: the even elements (low halves), then the odd ones.
    fn widen_pairs<S: Simd>(simd: S, words: S::u32s) -> (S::f32s, S::f32s);
    /// One word of two, widened: the even (low) element, then the odd one.
    fn widen_pair(word: u32) -> (f32, f32);
}

impl PairWiden for bf16 {
    #[inline(always)]
    fn widen_pairs<S: Simd>(simd: S, words: S::u32s) -> (S::f32s, S::f32s) {
        // A bf16 is the high half of an f32: the low element shifted up, the high one masked.
        let even = simd.wrapping_dyn_shl_u32s(words, simd.splat_u32s(16));
        let odd = simd.and_u32s(words, simd.splat_u32s(0xffff_0000));
        (
            simd.transmute_f32s_u32s(even),
            simd.transmute_f32s_u32s(odd),
        )
    }

    #[inline(always)]
    fn widen_pair(word: u32) -> (f32, f32) {
        (
            f32::from_bits(word << 16),
            f32::from_bits(word & 0xffff_0000),
        )
    }
}

impl WeightElem for bf16 {
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }

    fn as_pairs(src: &[Self]) -> Option<Pairs<'_>> {
        pairs_of(half::slice::HalfFloatSliceExt::reinterpret_cast(src)).map(Pairs::Bf16)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // A bf16 is the high half of an f32: the shift is exact for every value, and simple
        // enough for the compiler to turn into vector instructions.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

impl WeightElem for f16 {
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }

    fn as_pairs(src: &[Self]) -> Option<Pairs<'_>> {
        pairs_of(half::slice::HalfFloatSliceExt::reinterpret_cast(src)).map(Pairs::F16)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16_to_f32(s.to_bits());
        }
    }
}

impl PairWiden for f16 {
    #[inline(always)]
    fn widen_pairs<S: Simd>(simd: S, words: S::u32s) -> (S::f32s, S::f32s) {
        let low = simd.and_u32s(words, simd.splat_u32s(0xffff));
        let high = simd.wrapping_dyn_shr_u32s(words, simd.splat_u32s(16));
        (f16s_to_f32s(simd, low), f16s_to_f32s(simd, high))
    }

    #[inline(always)]
    fn widen_pair(word: u32) -> (f32, f32) {
        (f16_to_f32(word as u16), f16_to_f32((word >> 16) as u16))
    }
}

/// An f16's value as f32, exactly, in arithmetic a compiler turns into vector instructions
/// (`half`'s own conversion calls out per eight values here, which cost more than the product):
/// the exponent is rebased from 15 to 127, infinities and NaNs keep an all-ones exponent, and
/// zeros and subnormals are normalised by one float subtraction.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    const EXP_MASK: u32 = 0x7c00 << 13;
    let sign = u32::from(h & 0x8000) << 16;
    let body = u32::from(h & 0x7fff) << 13;
    let exp = body & EXP_MASK;
    let rebased = body + ((127 - 15) << 23);
    // Every case is computed and one chosen, so that the loop has no branches to vectorize.
    let special = rebased + ((128 - 16) << 23);
    let small = (f32::from_bits(rebased + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let value = if exp == EXP_MASK { special } else { rebased };
    let value = if exp == 0 { small } else { value };
    f32::from_bits(value | sign)
}

/// `bits` two by two as 32-bit words (little-endian memory), when aligned for it.
fn pairs_of(bits: &[u16]) -> Option<&[u32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    bytemuck::try_cast_slice(bits).ok()
}

/// [`f16_to_f32`] on a vector of f16 bits, one per 32-bit lane. Placed in an f32's bits, an
/// f16's exponent and mantissa make a number 2^112 times too small (subnormals included, as
/// f32 denormals), so one exact multiplication gives the value; infinities and NaNs instead
/// take an all-ones exponent.
#[inline(always)]
fn f16s_to_f32s<S: Simd>(simd: S, h: S::u32s) -> S::f32s {
    let splat = |v: u32| simd.splat_u32s(v);
    let exp_mask = splat(0x7c00 << 13);
    let sign = simd.wrapping_dyn_shl_u32s(simd.and_u32s(h, splat(0x8000)), splat(16));
    let body = simd.wrapping_dyn_shl_u32s(simd.and_u32s(h, splat(0x7fff)), splat(13));
    let scaled = simd.mul_f32s(
        simd.transmute_f32s_u32s(body),
        simd.splat_f32s(f32::from_bits((127 + 112) << 23)),
    );
    let special = simd.or_u32s(body, splat(0x7f80_0000));
    let exp = simd.and_u32s(body, exp_mask);
    let value = simd.select_u32s(
        simd.equal_u32s(exp, exp_mask),
        special,
        simd.transmute_u32s_f32s(scaled),
    );
    simd.transmute_f32s_u32s(simd.or_u32s(value, sign))
}

thread_local! {
    /// Where a thread widens the half-precision block it is about to use: at most one block
    /// ([`WEIGHT_BYTES`] of f32) per thread, reused from product to product.
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out = x · wᵀ` with `x` of `rows × width`, `w` of `outputs × width` (a linear layer's
/// weight, row-major, in f32, bf16 or f16) and `out` of `rows × outputs`.
///
/// # Panics
/// When a slice's length does not match the shape given; callers check shapes first.
pub fn rows_times_weights<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    width: usize,
    out: &mut [f32],
) {
    product(x, rows, w, width, out, f16c::available());
}

/// [`rows_times_weights`], with f16 weights widened by the CPU's F16C instruction when
/// `hardware_f16` (which the caller has checked), in registers by integer steps otherwise.
fn product<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    width: usize,
    out: &mut [f32],
    hardware_f16: bool,
) {
    assert!(
        width > 0 && x.len() == rows * width,
        "x is not rows × width"
    );
    assert_eq!(w.len() % width, 0, "w is not outputs × width");
    let outputs = w.len() / width;
    assert_eq!(out.len(), rows * outputs, "out is not rows × outputs");
    if rows == 0 || outputs == 0 {
        return;
    }
    // Tasks write output-major (one weight row's results for every input row together), which
    // keeps each task's writes contiguous; a transpose at the end gives row-major. One row is
    // both at once.
    let mut by_output = Vec::new();
    let dst: &mut [f32] = if rows == 1 {
        &mut *out
    } else {
        by_output.resize(outputs * rows, 0f32);
        &mut by_output
    };
    let arch = Arch::new();
    // Two tasks per thread, so that a thread slowed by something else does not hold up the
    // product, unless that makes tasks too small to be worth handing over.
    let threads = rayon::current_num_threads();
    let per_task = outputs
        .div_ceil(2 * threads)
        .max(MIN_TASK_FLOATS.div_ceil(width));
    let pairs = if width.is_multiple_of(2) {
        W::as_pairs(w)
    } else {
        None
    };
    if let Some(pairs) = pairs {
        let pair_task = PairTask {
            x,
            rows,
            width,
            per_task,
            threads,
            arch,
        };
        match pairs {
            Pairs::Bf16(words) => pair_task.run::<bf16>(words, dst),
            Pairs::F16(words) if hardware_f16 => pair_task.run_f16c(words, dst),
            Pairs::F16(words) => pair_task.run::<f16>(words, dst),
        }
    } else if threads == 1 || outputs <= per_task {
        arch.dispatch(Block {
            x,
            rows,
            w,
            width,
            dst,
        });
    } else {
        dst.par_chunks_mut(per_task * rows)
            .zip(w.par_chunks(per_task * width))
            .for_each(|(dst, w)| {
                arch.dispatch(Block {
                    x,
                    rows,
                    w,
                    width,
                    dst,
                })
            });
    }
    for (o, results) in by_output.chunks_exact(rows).enumerate() {
        for (r, v) in results.iter().enumerate() {
            out[r * outputs + o] = *v;
        }
    }
}

/// One task: a block of weight rows against every input row.
struct Block<'a, W> {
    x: &'a [f32],
    rows: usize,
    w: &'a [W],
    width: usize,
    dst: &'a mut [f32],
}

impl<W: WeightElem> WithSimd for Block<'_, W> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let Block {
            x,
            rows,
            w,
            width,
            dst,
        } = self;
        let sub = weight_block(width, std::mem::size_of::<f32>());
        // The buffer is taken out of the thread's slot rather than used inside `with`: a
        // closure does not inherit the vector instructions `with_simd` is compiled for, and the
        // product inlined into one would call each of them as a function.
        let mut widened = Vec::new();
        if W::as_f32(w).is_none() {
            widened = WIDENED.with(|b| b.take());
        }
        for (w, dst) in w.chunks(sub * width).zip(dst.chunks_mut(sub * rows)) {
            match W::as_f32(w) {
                Some(w) => sub_block(simd, x, rows, w, width, dst),
                None => {
                    widened.resize(w.len(), 0.0);
                    W::widen(w, &mut widened);
                    sub_block(simd, x, rows, &widened, width, dst);
                }
            }
        }
        if !widened.is_empty() {
            WIDENED.with(|b| *b.borrow_mut() = widened);
        }
    }
}

/// A product over half-precision weights read as words of two, split into tasks like
/// [`rows_times_weights`]'s.
struct PairTask<'a> {
    x: &'a [f32],
    rows: usize,
    width: usize,
    per_task: usize,
    threads: usize,
    arch: Arch,
}

impl PairTask<'_> {
    /// f16 pairs through [`f16c::block`], which reads them as plain f16 rows.
    fn run_f16c(&self, words: &[u32], dst: &mut [f32]) {
        let w: &[u16] = bytemuck::cast_slice(words);
        let (x, rows, width) = (self.x, self.rows, self.width);
        let outputs = w.len() / width;
        if self.threads == 1 || outputs <= self.per_task {
            f16c::block(x, rows, w, width, dst);
        } else {
            dst.par_chunks_mut(self.per_task * rows)
                .zip(w.par_chunks(self.per_task * width))
                .for_each(|(dst, w)| f16c::block(x, rows, w, width, dst));
        }
    }

    fn run<P: PairWiden>(&self, words: &[u32], dst: &mut [f32]) {
        let (rows, width, arch) = (self.rows, self.width, self.arch);
        // Each input row split into its even and odd elements, to meet the words' halves.
        let half = width / 2;
        let mut split = vec![0f32; rows * width];
        for (row, dst) in self
            .x
            .chunks_exact(width)
            .zip(split.chunks_exact_mut(width))
        {
            let (even, odd) = dst.split_at_mut(half);
            for (k, pair) in row.chunks_exact(2).enumerate() {
                even[k] = pair[0];
                odd[k] = pair[1];
            }
        }
        let task = |words: &[u32], dst: &mut [f32]| {
            arch.dispatch(PairBlock::<P> {
                split: &split,
                rows,
                words,
                half,
                dst,
                elem: std::marker::PhantomData,
            })
        };
        let outputs = words.len() / half;
        if self.threads == 1 || outputs <= self.per_task {
            task(words, dst);
        } else {
            dst.par_chunks_mut(self.per_task * rows)
                .zip(words.par_chunks(self.per_task * half))
                .for_each(|(dst, words)| task(words, dst));
        }
    }
}

/// One task of half-precision weights read as words of two: each word is widened in registers
/// ([`WeightElem::widen_pairs`]: its low half is the even element, its high half the odd one)
/// and multiplied with the input rows' even and odd elements, so the weights are read at two
/// bytes each and never written anywhere wider.
struct PairBlock<'a, W> {
    /// Input rows, each as its even elements then its odd ones.
    split: &'a [f32],
    rows: usize,
    words: &'a [u32],
    /// Words per weight row: half the width.
    half: usize,
    dst: &'a mut [f32],
    elem: std::marker::PhantomData<W>,
}

impl<W: PairWiden> WithSimd for PairBlock<'_, W> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let PairBlock {
            split,
            rows,
            words,
            half,
            dst,
            ..
        } = self;
        let width = 2 * half;
        let (group, sub) = (input_group(width), weight_block(width, 2));
        for (words, dst) in words.chunks(sub * half).zip(dst.chunks_mut(sub * rows)) {
            let mut start = 0;
            while start < rows {
                let n = (rows - start).min(group);
                let xs = &split[start * width..(start + n) * width];
                for (w_row, dst) in words.chunks_exact(half).zip(dst.chunks_exact_mut(rows)) {
                    let dst = &mut dst[start..start + n];
                    match n {
                        1 => dot_pairs::<S, W, 1>(simd, w_row, xs, dst),
                        2 => dot_pairs::<S, W, 2>(simd, w_row, xs, dst),
                        3 => dot_pairs::<S, W, 3>(simd, w_row, xs, dst),
                        _ => dot_pairs::<S, W, ROW_GROUP>(simd, w_row, xs, dst),
                    }
                }
                start += n;
            }
        }
    }
}

/// Dot products of one half-precision weight row, as words of two, with `G` split input rows:
/// even elements sum into one accumulator, odd into the other, in the same steps for every `G`.
#[inline(always)]
fn dot_pairs<S: Simd, W: PairWiden, const G: usize>(
    simd: S,
    w_row: &[u32],
    xs: &[f32],
    dst: &mut [f32],
) {
    let half = w_row.len();
    let (w_vec, w_tail) = S::as_simd_u32s(w_row);
    let rows: [(&[f32], &[f32]); G] = std::array::from_fn(|g| {
        let row = &xs[g * 2 * half..(g + 1) * 2 * half];
        row.split_at(half)
    });
    let even_x: [(&[S::f32s], &[f32]); G] = std::array::from_fn(|g| S::as_simd_f32s(rows[g].0));
    let odd_x: [(&[S::f32s], &[f32]); G] = std::array::from_fn(|g| S::as_simd_f32s(rows[g].1));
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 2]; G];
    for (j, &w) in w_vec.iter().enumerate() {
        let (even, odd) = W::widen_pairs(simd, w);
        for g in 0..G {
            acc[g][0] = simd.mul_add_e_f32s(even_x[g].0[j], even, acc[g][0]);
            acc[g][1] = simd.mul_add_e_f32s(odd_x[g].0[j], odd, acc[g][1]);
        }
    }
    for g in 0..G {
        let mut sum = simd.reduce_sum_f32s(simd.add_f32s(acc[g][0], acc[g][1]));
        let (even, odd) = (even_x[g].1, odd_x[g].1);
        for (k, &w) in w_tail.iter().enumerate() {
            let (e, o) = W::widen_pair(w);
            sum += even[k] * e;
            sum += odd[k] * o;
        }
        dst[g] = sum;
    }
}

/// A block of f32 weight rows (in cache) against every input row, in groups that stay in L1.
#[inline(always)]
fn sub_block<S: Simd>(simd: S, x: &[f32], rows: usize, w: &[f32], width: usize, dst: &mut [f32]) {
    let group = input_group(width);
    let mut start = 0;
    while start < rows {
        let n = (rows - start).min(group);
        let xs = &x[start * width..(start + n) * width];
        for (w_row, dst) in w.chunks_exact(width).zip(dst.chunks_exact_mut(rows)) {
            let dst = &mut dst[start..start + n];
            match n {
                1 => dot_rows::<S, 1>(simd, w_row, xs, dst),
                2 => dot_rows::<S, 2>(simd, w_row, xs, dst),
                3 => dot_rows::<S, 3>(simd, w_row, xs, dst),
                _ => dot_rows::<S, ROW_GROUP>(simd, w_row, xs, dst),
            }
        }
        start += n;
    }
}

/// Dot products of one weight row with `G` input rows (`xs` holds them back to back).
///
/// Each row sums into two vector accumulators (even and odd vectors, so that consecutive
/// fused multiply-adds do not wait on each other), then adds them, reduces the lanes and
/// finishes the tail that does not fill a vector, in that order: the same steps for every `G`.
#[inline(always)]
fn dot_rows<S: Simd, const G: usize>(simd: S, w_row: &[f32], xs: &[f32], dst: &mut [f32]) {
    let width = w_row.len();
    let (w_vec, w_tail) = S::as_simd_f32s(w_row);
    let split: [(&[S::f32s], &[f32]); G] =
        std::array::from_fn(|g| S::as_simd_f32s(&xs[g * width..(g + 1) * width]));
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 2]; G];
    let pairs = w_vec.len() / 2;
    for j in 0..pairs {
        let w0 = w_vec[2 * j];
        let w1 = w_vec[2 * j + 1];
        for g in 0..G {
            let xv = split[g].0;
            acc[g][0] = simd.mul_add_e_f32s(xv[2 * j], w0, acc[g][0]);
            acc[g][1] = simd.mul_add_e_f32s(xv[2 * j + 1], w1, acc[g][1]);
        }
    }
    if w_vec.len() % 2 == 1 {
        let last = w_vec.len() - 1;
        for g in 0..G {
            acc[g][0] = simd.mul_add_e_f32s(split[g].0[last], w_vec[last], acc[g][0]);
        }
    }
    for g in 0..G {
        let mut sum = simd.reduce_sum_f32s(simd.add_f32s(acc[g][0], acc[g][1]));
        for (a, b) in split[g].1.iter().zip(w_tail) {
            sum += a * b;
        }
        dst[g] = sum;
    }
}

#[cfg(test)]
mod tests;
