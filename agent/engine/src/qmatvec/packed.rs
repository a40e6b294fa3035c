//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 matrices repacked once, at load, so that eight weight rows
//! multiply side by side in the lanes of one register, with no horizontal sum and one stream of
//! bytes.
//!
//! As stored, a row is a run of blocks (an f16 scale; for Q4_1 and Q5_1 an f16 offset; for Q5_0
//! and Q5_1 32 fifth bits; then 16 bytes of nibbles, or for Q8_0 32 signed bytes), and a row's
//! product is a chain of multiply-adds, one per block, each waiting for the one before
//! (candle's order): about four cycles a block whatever the SIMD width. Reading eight rows at
//! once from the layout as stored ran at half that speed (see the dispatch in the parent
//! module).
//!
//! Here the eight rows of a group are interleaved block by block: their eight scales (16
//! bytes), then their eight offsets where the format has them, then for Q5_0 and Q5_1 the fifth
//! bits of four runs, 8 bytes a run (byte `r` of run `m` holds the fifth bits of row `r`'s
//! values `4m..4m+4` in its low half and of `16+4m..16+4m+4` in its high half), then runs of 32
//! bytes, run `m` holding bytes `4m..4m+4` of each row's values (four runs of nibbles, eight of
//! Q8_0's bytes). For Q8_0 run `m` is values `4m..4m+4` of each of the eight rows; for the
//! others its low nibbles are values `4m..4m+4` and its high nibbles values `16+4m..16+4m+4`.
//! One 32-bit lane is one row: multiplied with those four input values broadcast to every lane,
//! the lanes add up to the eight rows' sums. The packed matrix has the size of the original
//! (its bytes in another order, Q5's fifth bits regrouped); the stage holds it instead of the
//! original.
//!
//! Each row's float steps are those of candle's scalar reference kernels (`vec_dot_unopt`):
//! per block `(sum · d_w) · d_x` (for Q4_1 and Q5_1 plus `m_w · s_x`, the offset times the
//! input block's scaled sum), added to the row's sum in block order. Q4_0's stored values are
//! 0..15 for -8..7 and Q5_0's 0..31 for -16..15; their integer sums take back 8 or 16 times the
//! input block's sum, exactly.
//!
//! The superblock formats (Q2_K to Q6_K) are packed the same way, superblock by superblock
//! (`packed/superblocks.rs`).

use super::{BLOCK, Format, InputBlock, MAX_ROWS};

mod superblocks;
mod vnni;

/// Weight rows interleaved in a group: one 32-bit lane each.
pub const GROUP: usize = 8;

/// Bytes of a block of `format` and of the f16s at its start (scale, offset), when it is a
/// format this module packs.
fn block_bytes(format: Format) -> Option<(usize, usize)> {
    match format {
        Format::Q4_0 => Some((18, 2)),
        Format::Q4_1 => Some((20, 4)),
        Format::Q5_0 => Some((22, 2)),
        Format::Q5_1 => Some((24, 4)),
        Format::Q8_0 => Some((34, 2)),
        _ => None,
    }
}

/// Bytes of one packed block of eight rows, and of the f16s at its start, for the kernels'
/// parameters: Q8_0 where `q8`, else nibbles with an offset per block where `offset` and a
/// fifth bit per value where `fifth` ([`block_bytes`] times [`GROUP`]).
#[cfg(target_arch = "x86_64")]
const fn group_layout(q8: bool, offset: bool, fifth: bool) -> (usize, usize) {
    match (q8, offset, fifth) {
        (true, _, _) => (GROUP * 34, GROUP * 2),
        (false, true, false) => (GROUP * 20, GROUP * 4),
        (false, false, false) => (GROUP * 18, GROUP * 2),
        (false, false, true) => (GROUP * 22, GROUP * 2),
        (false, true, true) => (GROUP * 24, GROUP * 4),
    }
}

/// Packed weight groups and the slice of results they are written to.
#[cfg(target_arch = "x86_64")]
type Groups<'a, 'b> = (&'a [u8], &'b mut [f32]);

/// `w`'s groups (`groups` of them) and their results in `dst` (`rows` per output), split into
/// whole pairs of groups, for the VNNI kernels, and the last group when their count is odd.
#[cfg(target_arch = "x86_64")]
fn split_pairs<'a, 'b>(
    w: &'a [u8],
    dst: &'b mut [f32],
    groups: usize,
    rows: usize,
) -> (Groups<'a, 'b>, Groups<'a, 'b>) {
    let pairs = groups / 2;
    let (w_pairs, w_rest) = w.split_at(pairs * 2 * (w.len() / groups));
    let (d_pairs, d_rest) = dst.split_at_mut(pairs * 2 * GROUP * rows);
    ((w_pairs, d_pairs), (w_rest, d_rest))
}

/// Whether blocks of `format` carry a fifth bit per value.
fn fifth(format: Format) -> bool {
    matches!(format, Format::Q5_0 | Format::Q5_1)
}

/// Whether `format` is one of the superblock formats.
fn superblock(format: Format) -> bool {
    matches!(
        format,
        Format::Q4K | Format::Q5K | Format::Q6K | Format::Q2K | Format::Q3K
    )
}

/// Bytes one weight row takes packed, `width` values in `format` (a format [`packs`] takes).
fn row_bytes(format: Format, width: usize) -> usize {
    if superblock(format) {
        width / format.block_values() * superblocks::group_bytes(format) / GROUP
    } else {
        stored_row_bytes(format, width)
    }
}

/// Whether a matrix of `(outputs, width)` in `format` can be packed (the 32-value formats and
/// the superblock ones, whole groups of rows, whole blocks) and this CPU multiplies packed
/// matrices.
pub fn packs(format: Format, outputs: usize, width: usize) -> bool {
    (block_bytes(format).is_some() || superblock(format))
        && outputs > 0
        && outputs.is_multiple_of(GROUP)
        && width > 0
        && width.is_multiple_of(format.block_values())
        && super::simd()
}

/// The packed bytes of a matrix `w` of `width` columns in `format` (see the module's comment);
/// `None` where [`packs`] says no.
pub fn pack(format: Format, w: &[u8], width: usize) -> Option<Vec<u8>> {
    let stored = stored_row_bytes(format, width);
    if stored == 0 || !w.len().is_multiple_of(stored) || !packs(format, w.len() / stored, width) {
        return None;
    }
    let bytes = format.block_bytes();
    if superblock(format) {
        let supers = width / format.block_values();
        let mut packed = Vec::with_capacity(w.len() / stored * row_bytes(format, width));
        for group in w.chunks_exact(GROUP * stored) {
            for i in 0..supers {
                superblocks::pack_superblock(
                    format,
                    |r| &group[r * stored + i * bytes..r * stored + (i + 1) * bytes],
                    &mut packed,
                );
            }
        }
        return Some(packed);
    }
    let (_, head) = block_bytes(format)?;
    let blocks = width / BLOCK;
    let mut packed = Vec::with_capacity(w.len());
    for group in w.chunks_exact(GROUP * stored) {
        for i in 0..blocks {
            let block = |r: usize| {
                let at = r * stored + i * bytes;
                &group[at..at + bytes]
            };
            for h in (0..head).step_by(2) {
                for r in 0..GROUP {
                    packed.extend_from_slice(&block(r)[h..h + 2]);
                }
            }
            // The values: Q5's 32 fifth bits first, then 16 bytes of nibbles; else the values.
            let values = if fifth(format) { head + 4 } else { head };
            if fifth(format) {
                for m in 0..4 {
                    for r in 0..GROUP {
                        let b = block(r);
                        let qh =
                            u32::from_le_bytes([b[head], b[head + 1], b[head + 2], b[head + 3]]);
                        let low = (qh >> (4 * m)) & 0x0f;
                        let high = (qh >> (16 + 4 * m)) & 0x0f;
                        packed.push((low | (high << 4)) as u8);
                    }
                }
            }
            for m in 0..(bytes - values) / 4 {
                for r in 0..GROUP {
                    packed.extend_from_slice(&block(r)[values + 4 * m..values + 4 * m + 4]);
                }
            }
        }
    }
    Some(packed)
}

/// Bytes of one row of `width` values in `format` as the file stores it.
pub fn stored_row_bytes(format: Format, width: usize) -> usize {
    width / format.block_values() * format.block_bytes()
}

/// Appends row `row` of a matrix packed by [`pack`] to `out`, as the file stores it: what an
/// embedding lookup dequantizes where a tied head's table is held packed only.
///
/// # Panics
/// When `row` is past the matrix, or [`pack`] would not have packed this shape.
pub fn stored_row(format: Format, packed: &[u8], width: usize, row: usize, out: &mut Vec<u8>) {
    let row_bytes = row_bytes(format, width);
    assert!(
        (row + 1) * row_bytes <= packed.len(),
        "row {row} is past the packed matrix"
    );
    let group = &packed[row / GROUP * GROUP * row_bytes..][..GROUP * row_bytes];
    let r = row % GROUP;
    if superblock(format) {
        let bytes = superblocks::group_bytes(format);
        for b in group.chunks_exact(bytes) {
            superblocks::stored_superblock(format, b, r, out);
        }
        return;
    }
    let Some((bytes, head)) = block_bytes(format) else {
        panic!("{format:?} is not packed")
    };
    for b in group.chunks_exact(GROUP * bytes) {
        for h in (0..head).step_by(2) {
            out.extend_from_slice(&b[h * GROUP + 2 * r..][..2]);
        }
        let mut values = head * GROUP;
        if fifth(format) {
            let mut qh = 0u32;
            for m in 0..4 {
                let byte = b[values + GROUP * m + r] as u32;
                qh |= (byte & 0x0f) << (4 * m) | (byte >> 4) << (16 + 4 * m);
            }
            out.extend_from_slice(&qh.to_le_bytes());
            values += 4 * GROUP;
        }
        for m in 0..(bytes - head - if fifth(format) { 4 } else { 0 }) / 4 {
            out.extend_from_slice(&b[values + 4 * GROUP * m + 4 * r..][..4]);
        }
    }
}

/// `out = x · wᵀ` for `x` of `rows × width` f32 values (`rows` at most [`MAX_ROWS`]) and
/// `packed` a matrix in `format` from [`pack`], `out` of `rows × outputs`.
///
/// # Panics
/// When the lengths disagree with the shape, or [`packs`] would have said no.
pub fn rows_times_packed(
    format: Format,
    x: &[f32],
    rows: usize,
    packed: &[u8],
    width: usize,
    out: &mut [f32],
) {
    assert!(
        rows <= MAX_ROWS && x.len() == rows * width,
        "x is not rows × width"
    );
    assert!(
        block_bytes(format).is_some() || superblock(format),
        "{format:?} is not packed"
    );
    let blocks = width / format.block_values();
    let row_bytes = row_bytes(format, width);
    assert!(
        width.is_multiple_of(format.block_values())
            && packed.len().is_multiple_of(GROUP * row_bytes),
        "packed is not whole groups of rows"
    );
    let outputs = packed.len() / row_bytes;
    assert_eq!(out.len(), rows * outputs, "out is not rows × outputs");
    if rows == 0 || outputs == 0 {
        return;
    }
    if superblock(format) {
        let input = super::quantize_rows_super(x, width);
        super::spread(packed, row_bytes, rows, out, |w, dst| {
            superblocks::products(format, w, &input, blocks, dst)
        });
        return;
    }
    let input = super::quantize_rows(format, x, width);
    super::spread(packed, row_bytes, rows, out, |w, dst| {
        products(format, w, &input, blocks, dst)
    });
}

/// Every packed group of `w` (in `format`) times every input row, into `dst` output-major:
/// pairs of groups through the VNNI kernel where the CPU has it, the rest through AVX2.
#[cfg(target_arch = "x86_64")]
fn products(format: Format, w: &[u8], input: &[InputBlock], blocks: usize, dst: &mut [f32]) {
    if vnni::available() {
        let rows = input.len() / blocks;
        let groups = dst.len() / (GROUP * rows);
        let ((w_pairs, d_pairs), (w_rest, d_rest)) = split_pairs(w, dst, groups, rows);
        if !w_pairs.is_empty() {
            vnni::products(format, w_pairs, input, blocks, d_pairs);
        }
        if !w_rest.is_empty() {
            products_avx2(format, w_rest, input, blocks, d_rest);
        }
        return;
    }
    products_avx2(format, w, input, blocks, dst);
}

/// [`products`] through AVX2 only.
#[cfg(target_arch = "x86_64")]
fn products_avx2(format: Format, w: &[u8], input: &[InputBlock], blocks: usize, dst: &mut [f32]) {
    let Some(simd) = pulp::x86::V3::try_new() else {
        unreachable!("qmatvec::packs checked AVX2 and FMA")
    };
    let args = avx2::Packed {
        simd,
        w,
        input,
        blocks,
        dst,
    };
    match format {
        Format::Q8_0 => pulp::Simd::vectorize(simd, avx2::Kernel::<true, false, false>(args)),
        Format::Q4_1 => pulp::Simd::vectorize(simd, avx2::Kernel::<false, true, false>(args)),
        Format::Q5_0 => pulp::Simd::vectorize(simd, avx2::Kernel::<false, false, true>(args)),
        Format::Q5_1 => pulp::Simd::vectorize(simd, avx2::Kernel::<false, true, true>(args)),
        _ => pulp::Simd::vectorize(simd, avx2::Kernel::<false, false, false>(args)),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn products(_: Format, _: &[u8], _: &[InputBlock], _: usize, _: &mut [f32]) {
    unreachable!("qmatvec::packs is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The packed products through pulp's AVX2 token, written out inside `with_simd` as in the
    //! parent module (a closure would be compiled without AVX2).

    use pulp::bytemuck::cast;
    use pulp::x86::V3;
    use pulp::{Simd, WithSimd};
    use std::arch::x86_64::{__m256, __m256i};

    use super::super::avx2::{Avx2, array, prefetch};
    use super::super::{InputBlock, MAX_ROWS};
    use super::GROUP;

    pub(super) struct Packed<'a> {
        pub(super) simd: V3,
        pub(super) w: &'a [u8],
        pub(super) input: &'a [InputBlock],
        pub(super) blocks: usize,
        pub(super) dst: &'a mut [f32],
    }

    /// Packed products: Q8_0 where `Q8`, else a format of nibbles with an offset per block
    /// where `OFFSET` (Q4_1, Q5_1) and a fifth bit per value where `FIFTH` (Q5_0, Q5_1).
    pub(super) struct Kernel<'a, const Q8: bool, const OFFSET: bool, const FIFTH: bool>(
        pub(super) Packed<'a>,
    );

    impl<const Q8: bool, const OFFSET: bool, const FIFTH: bool> WithSimd
        for Kernel<'_, Q8, OFFSET, FIFTH>
    {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            self.0.run::<Q8, OFFSET, FIFTH>();
        }
    }

    /// Four input values, `qs[at..at + 4]`, as one 32-bit lane.
    #[inline(always)]
    pub(super) fn four(qs: &[i8], at: usize) -> i32 {
        i32::from_le_bytes([
            qs[at] as u8,
            qs[at + 1] as u8,
            qs[at + 2] as u8,
            qs[at + 3] as u8,
        ])
    }

    /// `sixteen` in each byte of `bits` that has its bit of `mask` set, else 0. (A function,
    /// not a closure: a closure would be compiled without AVX2.)
    #[inline(always)]
    pub(super) fn sixteen_where(s: V3, bits: __m256i, mask: __m256i, sixteen: __m256i) -> __m256i {
        let hit = s
            .avx2
            ._mm256_cmpeq_epi8(s.avx2._mm256_and_si256(bits, mask), mask);
        s.avx2._mm256_and_si256(hit, sixteen)
    }

    impl Packed<'_> {
        /// Every group of eight rows times every input row, in the format [`Kernel`]'s
        /// parameters name.
        #[inline(always)]
        fn run<const Q8: bool, const OFFSET: bool, const FIFTH: bool>(self) {
            let avx = Avx2 { simd: self.simd };
            let s = self.simd;
            let rows = self.input.len() / self.blocks;
            let (group_block, head) = super::group_layout(Q8, OFFSET, FIFTH);
            // Q5's fifth bits sit between the f16s and the nibbles; Q4_0 and Q5_0 store their
            // values above zero by this much.
            let runs_at = if FIFTH { head + 32 } else { head };
            let bias = match (OFFSET, FIFTH) {
                (false, false) => 8,
                (false, true) => 16,
                (true, _) => 0,
            };
            // A run's fifth bits: its 8 bytes in every 64-bit half, byte `r` copied into the
            // four bytes of lane `r`, then bit j (or 4 + j) of those kept in byte j.
            let spread = s.avx._mm256_setr_epi8(
                0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6,
                7, 7, 7, 7,
            );
            let bits_low = s.avx._mm256_set1_epi32(0x0804_0201);
            let bits_high = s.avx._mm256_set1_epi32(0x8040_2010_u32 as i32);
            let sixteen = s.avx._mm256_set1_epi8(0x10);
            let low = s.avx._mm256_set1_epi8(0x0f);
            let ones = s.avx._mm256_set1_epi16(1);
            for (group, dst) in self
                .w
                .chunks_exact(self.blocks * group_block)
                .zip(self.dst.chunks_exact_mut(GROUP * rows))
            {
                let mut acc = [s.avx._mm256_setzero_ps(); MAX_ROWS];
                for (i, b) in group.chunks_exact(group_block).enumerate() {
                    prefetch(s, b, group_block);
                    let mut d = [0u16; GROUP];
                    for (r, d) in d.iter_mut().enumerate() {
                        *d = u16::from_le_bytes([b[2 * r], b[2 * r + 1]]);
                    }
                    let scales = avx.halves(d);
                    let mut m = [0u16; GROUP];
                    if OFFSET {
                        for (r, m) in m.iter_mut().enumerate() {
                            *m = u16::from_le_bytes([b[16 + 2 * r], b[16 + 2 * r + 1]]);
                        }
                    }
                    let offsets = avx.halves(m);
                    // values[k]: four values of each row, those of input values `at(k)`;
                    // for Q8_0 their signed bytes (magnitudes in `magnitudes`), for Q4_0
                    // unsigned nibbles.
                    let mut values = [s.avx._mm256_setzero_si256(); 8];
                    let mut magnitudes = [s.avx._mm256_setzero_si256(); 8];
                    if Q8 {
                        for (k, (v, m)) in values.iter_mut().zip(&mut magnitudes).enumerate() {
                            *v = cast(array::<32>(&b[head + 32 * k..]));
                            *m = s.avx2._mm256_sign_epi8(*v, *v);
                        }
                    } else {
                        for m in 0..4 {
                            let run: __m256i = cast(array::<32>(&b[runs_at + 32 * m..]));
                            values[m] = s.avx2._mm256_and_si256(run, low);
                            values[4 + m] = s
                                .avx2
                                ._mm256_and_si256(s.avx2._mm256_srli_epi16::<4>(run), low);
                            if FIFTH {
                                let bits = u64::from_le_bytes(array::<8>(&b[head + 8 * m..]));
                                let each = s.avx2._mm256_shuffle_epi8(
                                    s.avx._mm256_set1_epi64x(bits as i64),
                                    spread,
                                );
                                values[m] = s.avx2._mm256_or_si256(
                                    values[m],
                                    sixteen_where(s, each, bits_low, sixteen),
                                );
                                values[4 + m] = s.avx2._mm256_or_si256(
                                    values[4 + m],
                                    sixteen_where(s, each, bits_high, sixteen),
                                );
                            }
                        }
                    }
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        let x = &self.input[r * self.blocks + i];
                        let sums = if Q8 {
                            // A pair of products reaches 2 · 128 · 127: each run's pairs
                            // widen to 32 bits before they are added.
                            let mut sums = s.avx._mm256_setzero_si256();
                            for (k, (v, m)) in values.iter().zip(&magnitudes).enumerate() {
                                let xs = s.avx._mm256_set1_epi32(four(&x.qs, 4 * k));
                                let signed = s.avx2._mm256_sign_epi8(xs, *v);
                                sums = s.avx2._mm256_add_epi32(
                                    sums,
                                    s.avx2._mm256_madd_epi16(
                                        s.avx2._mm256_maddubs_epi16(*m, signed),
                                        ones,
                                    ),
                                );
                            }
                            sums
                        } else {
                            // Pairs of products summed in 16 bits: four runs of at most
                            // 2 · 31 · 127 each (eight of 2 · 15 · 127) stay below 2^15.
                            let mut sums = s.avx._mm256_setzero_si256();
                            let mut pairs = s.avx._mm256_setzero_si256();
                            for (k, v) in values.iter().enumerate() {
                                let at = if k < 4 { 4 * k } else { 16 + 4 * (k - 4) };
                                let xs = s.avx._mm256_set1_epi32(four(&x.qs, at));
                                pairs = s
                                    .avx2
                                    ._mm256_add_epi16(pairs, s.avx2._mm256_maddubs_epi16(*v, xs));
                                if (FIFTH && k == 3) || k == 7 {
                                    sums = s.avx2._mm256_add_epi32(
                                        sums,
                                        s.avx2._mm256_madd_epi16(pairs, ones),
                                    );
                                    pairs = s.avx._mm256_setzero_si256();
                                }
                            }
                            if bias == 0 {
                                sums
                            } else {
                                s.avx2
                                    ._mm256_sub_epi32(sums, s.avx._mm256_set1_epi32(bias * x.sum))
                            }
                        };
                        let mut term: __m256 = s.avx._mm256_mul_ps(
                            s.avx._mm256_mul_ps(s.avx._mm256_cvtepi32_ps(sums), scales),
                            s.avx._mm256_set1_ps(x.d),
                        );
                        if OFFSET {
                            term = s.avx._mm256_add_ps(
                                term,
                                s.avx._mm256_mul_ps(offsets, s.avx._mm256_set1_ps(x.s)),
                            );
                        }
                        *acc = s.avx._mm256_add_ps(*acc, term);
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    let v: [f32; GROUP] = cast(*acc);
                    for (o, v) in v.into_iter().enumerate() {
                        dst[o * rows + r] = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
