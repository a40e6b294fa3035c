//! The superblock formats (Q2_K to Q6_K) repacked like the 32-value formats of the parent
//! module: eight rows interleaved superblock by superblock, one 32-bit lane a row.
//!
//! A superblock of eight rows becomes, for Q4_K and Q5_K: the rows' eight f16 scales (16
//! bytes) and eight f16 offset scales (16 bytes); their 6-bit sub-block scales decoded to a
//! byte each, sub-block by sub-block (64 bytes, `[sub-block][row]`); their 6-bit sub-block
//! offsets decoded likewise, by pairs of sub-blocks (64 bytes, `[pair][row][2]`, the order a
//! 16-bit multiply-add pairs them with the input's sums); for Q5_K the fifth bits as eight
//! runs of 32 bytes (run `m` holds bytes `4m..4m+4` of each row's 32 bytes of fifth bits,
//! which carry the bits of all eight sub-blocks for those four positions); then 32 runs of
//! nibbles, run `8c + m` holding bytes `32c + 4m..32c + 4m + 4` of each row's 128 (low nibbles
//! values `64c + 4m..` of sub-block `2c`, high nibbles of sub-block `2c + 1`).
//!
//! For Q6_K: the rows' f16 scales (16 bytes); their sixteen 8-bit sub-block scales by pairs of
//! sub-blocks (128 bytes, `[pair][row][2]`); then for each half `h` of the superblock and each
//! `n` of 0..8 three runs of 32 bytes, bytes `4n..4n+4` of each row's `ql[64h..]`, of its
//! `ql[64h + 32..]` and of its `qh[32h..]`: together the four 6-bit values of positions
//! `4n..4n+4` in each of the half's four quarters.
//!
//! Q2_K and Q3_K follow Q6_K's plan: the rows' f16 scales (for Q2_K then their f16 offset
//! scales), their sub-block scales by pairs (Q2_K's bytes as stored, a 4-bit scale and a 4-bit
//! offset each; Q3_K's 6-bit scales decoded to a byte each, 128 bytes for 96), for Q3_K its
//! bit plane as eight runs of 32 bytes (bytes `4n..4n+4` of each row's 32, the third bits of
//! positions `4n..4n+4` of all eight 32-value steps), then sixteen runs of 32 bytes, bytes
//! `32h + 4n..` of each row's 64 bytes of 2-bit values (positions `4n..4n+4` of the four steps
//! of half `h`).
//!
//! Q4_K, Q5_K and Q3_K grow by the decoded scales, 32 bytes per superblock of eight rows (2.8%,
//! 2.3% and 3.6%); Q6_K and Q2_K keep their size, and everything else is the file's bytes
//! moved. The integer sums are exact, as in [`k`](crate::qmatvec::k); the float steps per
//! superblock (its integer sum times its scale times the input's, its offsets' likewise) are
//! those of the scalar references (that module's, candle's `vec_dot_unopt` for Q2_K and Q3_K)
//! in another order, one float lane per row, so results are bounded against them, not equal.

use super::super::k::{
    InputSuper, Q4K_QS, Q4K_SCALES, Q5K_QH, Q5K_QS, Q6K_D, Q6K_QH, Q6K_SCALES, q4k_scales,
};
use super::super::{Format, MAX_ROWS};
use super::GROUP;

/// Offsets within a packed Q4_K or Q5_K superblock of eight rows.
pub(super) const D: usize = 0;
pub(super) const DMIN: usize = 16;
pub(super) const SCALES: usize = 32;
pub(super) const MINS: usize = 96;
pub(super) const FIFTH: usize = 160;
/// Where Q4_K's nibbles start; Q5_K's start 256 bytes of fifth bits later.
pub(super) const Q4K_RUNS: usize = 160;
pub(super) const Q5K_RUNS: usize = FIFTH + 256;
/// Offsets within a packed Q6_K superblock of eight rows (Q3_K's scales too).
pub(super) const Q6_SCALES: usize = 16;
pub(super) const Q6_RUNS: usize = 144;
/// Offsets within a packed Q2_K superblock of eight rows (its scales at `DMIN`).
pub(super) const Q2_SCALES: usize = 32;
pub(super) const Q2_RUNS: usize = 160;
/// Offsets within a packed Q3_K superblock of eight rows.
pub(super) const Q3_BITS: usize = 144;
pub(super) const Q3_RUNS: usize = 400;
/// Byte offsets within a Q2_K superblock as stored: 16 bytes of scales, 64 of values, then
/// the f16 scale and offset scale.
const Q2K_QS: usize = 16;
const Q2K_D: usize = 80;
/// Byte offsets within a Q3_K superblock as stored: 32 bytes of bit plane, 64 of 2-bit
/// values, 12 of scales, then the f16 scale.
const Q3K_QS: usize = 32;
const Q3K_SCALES: usize = 96;
const Q3K_D: usize = 108;

/// Bytes of one superblock of eight rows, packed.
pub(super) fn group_bytes(format: Format) -> usize {
    match format {
        Format::Q4K => Q4K_RUNS + 1024,
        Format::Q5K => Q5K_RUNS + 1024,
        Format::Q6K => Q6_RUNS + 1536,
        Format::Q2K => Q2_RUNS + 512,
        Format::Q3K => Q3_RUNS + 512,
        _ => unreachable!("{format:?} is not a superblock format"),
    }
}

/// The sixteen 6-bit scales of a Q3_K superblock (before their centre 32 is taken off), from
/// its 12 bytes: the low four bits of scales 0-7 in the low nibbles of bytes 0-7 and of 8-15
/// in their high nibbles; the top two bits in bytes 8-11, scale `4k + i` at bits `2k` of byte
/// `8 + i`.
fn q3k_scales(b: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { b[j] & 0x0f } else { b[j - 8] >> 4 };
        let high = (b[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = low | high << 4;
    }
    out
}

/// [`q3k_scales`]' 12 bytes from the sixteen scales.
fn q3k_scale_bytes(sc: &[u8; 16]) -> [u8; 12] {
    let mut b = [0u8; 12];
    for j in 0..16 {
        if j < 8 {
            b[j] |= sc[j] & 0x0f;
        } else {
            b[j - 8] |= (sc[j] & 0x0f) << 4;
        }
        b[8 + j % 4] |= (sc[j] >> 4) << (2 * (j / 4));
    }
    b
}

/// Appends the packed superblock of eight rows whose superblocks `block(r)` gives.
pub(super) fn pack_superblock<'a>(
    format: Format,
    block: impl Fn(usize) -> &'a [u8],
    out: &mut Vec<u8>,
) {
    // Bytes `at..at + n` of each row's superblock, one row after another: four of the values,
    // two of an f16 or of a pair of scales.
    let each = |out: &mut Vec<u8>, at: usize, n: usize| {
        for r in 0..GROUP {
            out.extend_from_slice(&block(r)[at..at + n]);
        }
    };
    let run = |out: &mut Vec<u8>, at: usize| each(out, at, 4);
    if format == Format::Q2K {
        for at in [Q2K_D, Q2K_D + 2] {
            each(out, at, 2);
        }
        for pair in 0..8 {
            each(out, 2 * pair, 2);
        }
        for at in 0..16 {
            run(out, Q2K_QS + 4 * at);
        }
        return;
    }
    if format == Format::Q3K {
        each(out, Q3K_D, 2);
        let decoded: Vec<[u8; 16]> = (0..GROUP)
            .map(|r| q3k_scales(&block(r)[Q3K_SCALES..Q3K_SCALES + 12]))
            .collect();
        for pair in 0..8 {
            for sc in &decoded {
                // Signed, around the centre 32 the format stores them above.
                out.extend_from_slice(&[
                    sc[2 * pair].wrapping_sub(32),
                    sc[2 * pair + 1].wrapping_sub(32),
                ]);
            }
        }
        for n in 0..8 {
            run(out, 4 * n);
        }
        for at in 0..16 {
            run(out, Q3K_QS + 4 * at);
        }
        return;
    }
    if format == Format::Q6K {
        each(out, Q6K_D, 2);
        for pair in 0..8 {
            each(out, Q6K_SCALES + 2 * pair, 2);
        }
        for h in 0..2 {
            for n in 0..8 {
                run(out, 64 * h + 4 * n);
                run(out, 64 * h + 32 + 4 * n);
                run(out, Q6K_QH + 32 * h + 4 * n);
            }
        }
        return;
    }
    let five = format == Format::Q5K;
    let decoded: Vec<([u8; 8], [u8; 8])> = (0..GROUP)
        .map(|r| q4k_scales(&block(r)[Q4K_SCALES..Q4K_QS]))
        .collect();
    // Each row's f16 scale of scales, then of offsets (bytes 0 and 2 of its superblock).
    for at in [0, 2] {
        each(out, at, 2);
    }
    for j in 0..8 {
        for (sc, _) in &decoded {
            out.push(sc[j]);
        }
    }
    for c in 0..4 {
        for (_, m) in &decoded {
            out.extend_from_slice(&[m[2 * c], m[2 * c + 1]]);
        }
    }
    if five {
        for m in 0..8 {
            run(out, Q5K_QH + 4 * m);
        }
    }
    let qs = if five { Q5K_QS } else { Q4K_QS };
    for c in 0..4 {
        for m in 0..8 {
            run(out, qs + 32 * c + 4 * m);
        }
    }
}

/// Appends row `r`'s superblock, as the file stores it, from the packed superblock of its
/// eight rows `b`: the inverse of [`pack_superblock`] for one row.
pub(super) fn stored_superblock(format: Format, b: &[u8], r: usize, out: &mut Vec<u8>) {
    let four = |at: usize| &b[at + 4 * r..at + 4 * r + 4];
    if format == Format::Q2K {
        for pair in 0..8 {
            out.extend_from_slice(&b[Q2_SCALES + 16 * pair + 2 * r..][..2]);
        }
        for at in 0..16 {
            out.extend_from_slice(four(Q2_RUNS + 32 * at));
        }
        out.extend_from_slice(&b[2 * r..2 * r + 2]);
        out.extend_from_slice(&b[DMIN + 2 * r..DMIN + 2 * r + 2]);
        return;
    }
    if format == Format::Q3K {
        for n in 0..8 {
            out.extend_from_slice(four(Q3_BITS + 32 * n));
        }
        for at in 0..16 {
            out.extend_from_slice(four(Q3_RUNS + 32 * at));
        }
        let mut sc = [0u8; 16];
        for (j, sc) in sc.iter_mut().enumerate() {
            *sc = b[Q6_SCALES + 16 * (j / 2) + 2 * r + j % 2].wrapping_add(32);
        }
        out.extend_from_slice(&q3k_scale_bytes(&sc));
        out.extend_from_slice(&b[2 * r..2 * r + 2]);
        return;
    }
    if format == Format::Q6K {
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for h in 0..2 {
            for n in 0..8 {
                let at = Q6_RUNS + 96 * (8 * h + n);
                ql[64 * h + 4 * n..][..4].copy_from_slice(four(at));
                ql[64 * h + 32 + 4 * n..][..4].copy_from_slice(four(at + 32));
                qh[32 * h + 4 * n..][..4].copy_from_slice(four(at + 64));
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        for pair in 0..8 {
            out.extend_from_slice(&b[Q6_SCALES + 16 * pair + 2 * r..][..2]);
        }
        out.extend_from_slice(&b[2 * r..2 * r + 2]);
        return;
    }
    out.extend_from_slice(&b[D + 2 * r..D + 2 * r + 2]);
    out.extend_from_slice(&b[DMIN + 2 * r..DMIN + 2 * r + 2]);
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        sc[j] = b[SCALES + GROUP * j + r];
        m[j] = b[MINS + 16 * (j / 2) + 2 * r + j % 2];
    }
    // The 12 bytes of six-bit scales and offsets, as `q4k_scales` reads them.
    for j in 0..4 {
        out.push(sc[j] | (sc[j + 4] >> 4) << 6);
    }
    for j in 0..4 {
        out.push(m[j] | (m[j + 4] >> 4) << 6);
    }
    for j in 0..4 {
        out.push((sc[j + 4] & 0x0f) | (m[j + 4] & 0x0f) << 4);
    }
    let runs_at = if format == Format::Q5K {
        for m in 0..8 {
            out.extend_from_slice(four(FIFTH + 32 * m));
        }
        Q5K_RUNS
    } else {
        Q4K_RUNS
    };
    for c in 0..4 {
        for m in 0..8 {
            out.extend_from_slice(four(runs_at + 256 * c + 32 * m));
        }
    }
}

/// Every packed group of eight rows of `w` (in `format`, `supers` superblocks a row) times
/// every input row of `input` (rows of `supers` superblocks), into `dst` output-major: pairs
/// of groups through the VNNI kernels where the CPU has them, the rest through AVX2.
#[cfg(target_arch = "x86_64")]
pub(super) fn products(
    format: Format,
    w: &[u8],
    input: &[InputSuper],
    supers: usize,
    dst: &mut [f32],
) {
    if super::vnni::available() {
        // Pairs of groups through the VNNI kernel, a last group alone through AVX2.
        let rows = input.len() / supers;
        let groups = dst.len() / (GROUP * rows);
        let ((w_pairs, d_pairs), (w_rest, d_rest)) = super::split_pairs(w, dst, groups, rows);
        if !w_pairs.is_empty() {
            super::vnni::products_super(format, w_pairs, input, supers, d_pairs);
        }
        if !w_rest.is_empty() {
            products_avx2(format, w_rest, input, supers, d_rest);
        }
        return;
    }
    products_avx2(format, w, input, supers, dst);
}

/// [`products`] through AVX2 only.
#[cfg(target_arch = "x86_64")]
pub(super) fn products_avx2(
    format: Format,
    w: &[u8],
    input: &[InputSuper],
    supers: usize,
    dst: &mut [f32],
) {
    let Some(simd) = pulp::x86::V3::try_new() else {
        unreachable!("qmatvec::packs checked AVX2 and FMA")
    };
    let args = avx2::Packed {
        simd,
        w,
        input,
        supers,
        dst,
    };
    // One input row gets code of its own, where the compiler knows the row count: its sums
    // stay in registers rather than in arrays for sixteen rows.
    let one = input.len() == supers;
    match (format, one) {
        (Format::Q4K, true) => pulp::Simd::vectorize(simd, avx2::Q4k::<false, true>(args)),
        (Format::Q4K, false) => pulp::Simd::vectorize(simd, avx2::Q4k::<false, false>(args)),
        (Format::Q5K, true) => pulp::Simd::vectorize(simd, avx2::Q4k::<true, true>(args)),
        (Format::Q5K, false) => pulp::Simd::vectorize(simd, avx2::Q4k::<true, false>(args)),
        (Format::Q6K, true) => pulp::Simd::vectorize(simd, avx2::Sixteens::<6, true>(args)),
        (Format::Q6K, false) => pulp::Simd::vectorize(simd, avx2::Sixteens::<6, false>(args)),
        (Format::Q2K, true) => pulp::Simd::vectorize(simd, avx2::Sixteens::<2, true>(args)),
        (Format::Q2K, false) => pulp::Simd::vectorize(simd, avx2::Sixteens::<2, false>(args)),
        (Format::Q3K, true) => pulp::Simd::vectorize(simd, avx2::Sixteens::<3, true>(args)),
        (Format::Q3K, false) => pulp::Simd::vectorize(simd, avx2::Sixteens::<3, false>(args)),
        _ => unreachable!("{format:?} is not a superblock format"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn products(_: Format, _: &[u8], _: &[InputSuper], _: usize, _: &mut [f32]) {
    unreachable!("qmatvec::packs is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
mod avx2;
