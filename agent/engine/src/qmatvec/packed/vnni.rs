//! The packed products on CPUs with AVX-512 and its VNNI dot product (Intel server CPUs since
//! Cascade Lake, client ones of the Ice Lake and Tiger Lake years, AMD since Zen 4): two
//! groups of eight weight rows side by side in the sixteen 32-bit lanes of one register, and
//! `vpdpbusd`, which multiplies four unsigned weight bytes by four signed input bytes and adds
//! the four products into a lane in one instruction.
//!
//! The AVX2 kernels take three instructions for the same four products in eight lanes (a byte
//! multiply-add into 16 bits, a 16-bit add, and every few runs a widening to 32 bits), and a
//! batch of input rows repeats them for every row: a decode pass of four sequences cost 2.2-2.9x
//! one on a model that sits in the cache. Here each row's share is one instruction for sixteen
//! lanes' four products.
//!
//! Every weight byte goes in unsigned: Q4's nibbles and Q5's five bits are, and a Q8_0 byte is
//! read with its top bit flipped (`w + 128`); the integer sum then takes back 8, 16 or 128 times
//! the input block's sum, exactly, as the AVX2 kernels do for Q4_0 and Q5_0. The float steps per
//! lane are the AVX2 kernel's, one lane a row, so a row's result has the same bits on either
//! path, in any batch.
//!
//! The three kernels each write out their loops over pairs of groups and blocks, as the AVX2
//! kernels do: one loop shared through a closure would compile the closure's body without
//! this module's target features.
//!
//! pulp, through which the crate reaches SIMD safely, has no VNNI instructions, so this module
//! is allowed `unsafe` for one call: entering the kernel, compiled for these features, after
//! checking that the CPU has them. Inside, the intrinsics are safe functions (within functions
//! compiled for their features), and every load reads a checked slice.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use super::super::k::InputSuper;
use super::super::{Format, InputBlock};

/// Whether this CPU runs [`products`]: AVX-512 F, BW, DQ, VL and VNNI (and AVX2, FMA and
/// F16C, which every such CPU has). `CLUSTER_ENGINE_SIMD=avx2` in the environment says no, to
/// compare the two paths on one machine.
pub(in super::super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE
        .get_or_init(|| std::env::var("CLUSTER_ENGINE_SIMD").as_deref() != Ok("avx2") && detected())
}

/// Whether the CPU has the features, whatever the environment says.
pub(in super::super) fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
            && has!("avx512vnni")
            && has!("avx2")
            && has!("fma")
            && has!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Every packed group of `w` (in a 32-value `format`, `blocks` blocks a row) times every
/// input row, into `dst` output-major, as the parent module's AVX2 `products` does. `w` holds
/// an even number of groups.
///
/// # Panics
/// When [`detected`] is false, or the slices disagree with the shapes.
pub(in super::super) fn products(
    format: Format,
    w: &[u8],
    input: &[InputBlock],
    blocks: usize,
    dst: &mut [f32],
) {
    assert!(detected(), "the VNNI kernel was called on a CPU without it");
    let Some((bytes, _)) = super::block_bytes(format) else {
        panic!("{format:?} is not a 32-value format")
    };
    let pair = 2 * super::GROUP * bytes * blocks;
    let rows = input.len() / blocks;
    assert!(blocks > 0 && input.len() == rows * blocks && rows <= super::MAX_ROWS);
    assert!(w.len().is_multiple_of(pair) && dst.len() == w.len() / pair * 2 * super::GROUP * rows);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `detected` checked just above that the CPU has every feature the `x86` functions
    // are compiled for; they touch memory only through the slices they are given.
    unsafe {
        // The batch sizes of decode passes get code of their own, where the compiler keeps
        // each row's sums in registers; other counts keep them in an array.
        macro_rules! rows {
            ($q8:expr, $offset:expr, $fifth:expr) => {
                match rows {
                    1 => x86::run::<$q8, $offset, $fifth, 1>(w, input, blocks, dst),
                    2 => x86::run::<$q8, $offset, $fifth, 2>(w, input, blocks, dst),
                    4 => x86::run::<$q8, $offset, $fifth, 4>(w, input, blocks, dst),
                    _ => x86::run::<$q8, $offset, $fifth, 0>(w, input, blocks, dst),
                }
            };
        }
        match format {
            Format::Q8_0 => rows!(true, false, false),
            Format::Q4_1 => rows!(false, true, false),
            Format::Q5_0 => rows!(false, false, true),
            Format::Q5_1 => rows!(false, true, true),
            _ => rows!(false, false, false),
        }
    }
}

/// Every packed group of `w` (in a superblock format, `supers` superblocks a row) times every
/// input row, into `dst` output-major, as the AVX2 superblock kernels do. `w` holds an even
/// number of groups.
///
/// Each sub-block's products go into one 32-bit lane per row with `vpdpbusd` and are then
/// multiplied by the sub-block's scale as integers (the AVX2 kernels sum pairs in 16 bits and
/// scale them with a 16-bit multiply-add); the superblock's integer sums are the same, and so
/// are the float steps after them.
///
/// # Panics
/// When [`detected`] is false, or the slices disagree with the shapes.
pub(in super::super) fn products_super(
    format: Format,
    w: &[u8],
    input: &[InputSuper],
    supers: usize,
    dst: &mut [f32],
) {
    assert!(detected(), "the VNNI kernel was called on a CPU without it");
    let pair = 2 * super::superblocks::group_bytes(format) * supers;
    let rows = input.len() / supers;
    assert!(supers > 0 && input.len() == rows * supers && rows <= super::MAX_ROWS);
    assert!(w.len().is_multiple_of(pair) && dst.len() == w.len() / pair * 2 * super::GROUP * rows);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `products`.
    unsafe {
        macro_rules! rows {
            ($kernel:ident, $kind:expr) => {
                match rows {
                    1 => x86::$kernel::<$kind, 1>(w, input, supers, dst),
                    2 => x86::$kernel::<$kind, 2>(w, input, supers, dst),
                    4 => x86::$kernel::<$kind, 4>(w, input, supers, dst),
                    _ => x86::$kernel::<$kind, 0>(w, input, supers, dst),
                }
            };
        }
        match format {
            Format::Q4K => rows!(q4k, false),
            Format::Q5K => rows!(q4k, true),
            Format::Q6K => rows!(sixteens, 6),
            Format::Q2K => rows!(sixteens, 2),
            Format::Q3K => rows!(sixteens, 3),
            _ => panic!("{format:?} is not a superblock format"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::super::k::InputSuper;
    use super::super::super::{InputBlock, MAX_ROWS};
    use super::super::GROUP;
    use super::super::superblocks::{
        D, DMIN, FIFTH, MINS, Q2_RUNS, Q2_SCALES, Q3_BITS, Q3_RUNS, Q4K_RUNS, Q5K_RUNS, Q6_RUNS,
        Q6_SCALES, SCALES,
    };

    /// `N` bytes from `at`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn bytes<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[at..at + N]);
        a
    }

    /// 32 bytes of group `a` in the low half, the same 32 of group `b` in the high half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn pair(a: &[u8], b: &[u8], at: usize) -> __m512i {
        let low: __m256i = bytemuck::cast(bytes::<32>(a, at));
        let high: __m256i = bytemuck::cast(bytes::<32>(b, at));
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
    }

    /// The eight f16s at `at` of each group, widened: group `a`'s rows in lanes 0-7.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn halves(a: &[u8], b: &[u8], at: usize) -> __m512 {
        let low: __m128i = bytemuck::cast(bytes::<16>(a, at));
        let high: __m128i = bytemuck::cast(bytes::<16>(b, at));
        _mm512_cvtph_ps(_mm256_set_m128i(high, low))
    }

    /// Four input values, `qs[at..at + 4]`, in every lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn four(qs: &[i8], at: usize) -> __m512i {
        _mm512_set1_epi32(i32::from_le_bytes([
            qs[at] as u8,
            qs[at + 1] as u8,
            qs[at + 2] as u8,
            qs[at + 3] as u8,
        ]))
    }

    /// Asks for the cache lines 4 KiB past `bytes` bytes from `b`'s start, as the AVX2
    /// kernels do (a hint: an address past the weights is never read).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn prefetch(b: &[u8], bytes: usize) {
        let ahead = b.as_ptr().wrapping_add(4096);
        for line in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast::<i8>());
        }
    }

    /// Where [`super::products`] says: `Q8` for Q8_0, else nibbles with an offset per block
    /// where `OFFSET` (Q4_1, Q5_1) and a fifth bit per value where `FIFTH` (Q5_0, Q5_1).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) fn run<const Q8: bool, const OFFSET: bool, const FIFTH: bool, const ROWS: usize>(
        w: &[u8],
        input: &[InputBlock],
        blocks: usize,
        dst: &mut [f32],
    ) {
        let rows = if ROWS > 0 { ROWS } else { input.len() / blocks };
        let (group_block, head) = super::super::group_layout(Q8, OFFSET, FIFTH);
        let runs_at = if FIFTH { head + 32 } else { head };
        let bias: i32 = match (Q8, OFFSET, FIFTH) {
            (true, _, _) => 128,
            (false, false, false) => 8,
            (false, false, true) => 16,
            (false, true, _) => 0,
        };
        // A run's fifth bits: the 8 bytes of each group in both 64-bit halves of its two
        // 128-bit quarters, byte `r` copied into the four bytes of lane `r`, then bit j (or
        // 4 + j) of those tested in byte j.
        let spread = _mm512_set_epi8(
            7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0,
            0, 0, 0, 7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1,
            1, 1, 0, 0, 0, 0,
        );
        let bits_low = _mm512_set1_epi32(0x0804_0201);
        let bits_high = _mm512_set1_epi32(0x8040_2010_u32 as i32);
        let sixteen = _mm512_set1_epi8(0x10);
        let low = _mm512_set1_epi8(0x0f);
        let flip = _mm512_set1_epi8(-128);
        let group_bytes = blocks * group_block;
        for (two, dst) in w
            .chunks_exact(2 * group_bytes)
            .zip(dst.chunks_exact_mut(2 * GROUP * rows))
        {
            let (ga, gb) = two.split_at(group_bytes);
            let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
            for (i, (a, b)) in ga
                .chunks_exact(group_block)
                .zip(gb.chunks_exact(group_block))
                .enumerate()
            {
                prefetch(a, group_block);
                prefetch(b, group_block);
                let scales = halves(a, b, 0);
                let offsets = if OFFSET {
                    halves(a, b, 16)
                } else {
                    _mm512_setzero_ps()
                };
                // values[k]: four values of each row (unsigned), those of input values `at(k)`.
                let mut values = [_mm512_setzero_si512(); 8];
                if Q8 {
                    for (k, v) in values.iter_mut().enumerate() {
                        *v = _mm512_xor_si512(pair(a, b, head + 32 * k), flip);
                    }
                } else {
                    for m in 0..4 {
                        let run = pair(a, b, runs_at + 32 * m);
                        values[m] = _mm512_and_si512(run, low);
                        values[4 + m] = _mm512_and_si512(_mm512_srli_epi16::<4>(run), low);
                        if FIFTH {
                            let fa = i64::from_le_bytes(bytes::<8>(a, head + 8 * m));
                            let fb = i64::from_le_bytes(bytes::<8>(b, head + 8 * m));
                            let each = _mm512_shuffle_epi8(
                                _mm512_set_epi64(fb, fb, fb, fb, fa, fa, fa, fa),
                                spread,
                            );
                            values[m] = _mm512_mask_add_epi8(
                                values[m],
                                _mm512_test_epi8_mask(each, bits_low),
                                values[m],
                                sixteen,
                            );
                            values[4 + m] = _mm512_mask_add_epi8(
                                values[4 + m],
                                _mm512_test_epi8_mask(each, bits_high),
                                values[4 + m],
                                sixteen,
                            );
                        }
                    }
                }
                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                    let x = &input[r * blocks + i];
                    // Two chains of four, so that each product waits on three before it, not
                    // seven (integers: the order changes nothing).
                    let mut even = _mm512_set1_epi32(-bias * x.sum);
                    let mut odd = _mm512_setzero_si512();
                    for k in (0..8).step_by(2) {
                        let at = |k: usize| if Q8 || k < 4 { 4 * k } else { 16 + 4 * (k - 4) };
                        even = _mm512_dpbusd_epi32(even, values[k], four(&x.qs, at(k)));
                        odd = _mm512_dpbusd_epi32(odd, values[k + 1], four(&x.qs, at(k + 1)));
                    }
                    let sums = _mm512_add_epi32(even, odd);
                    let mut term = _mm512_mul_ps(
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums), scales),
                        _mm512_set1_ps(x.d),
                    );
                    if OFFSET {
                        term = _mm512_add_ps(term, _mm512_mul_ps(offsets, _mm512_set1_ps(x.s)));
                    }
                    *acc = _mm512_add_ps(*acc, term);
                }
            }
            write(&acc, rows, dst);
        }
    }

    /// Two adjacent i16 sums from `at`, in every lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn pair16(sums: &[i16], at: usize) -> __m512i {
        _mm512_set1_epi32((sums[at] as u16 as u32 | ((sums[at + 1] as u16 as u32) << 16)) as i32)
    }

    /// Eight bytes at `at` of each group, one per lane: group `a`'s in lanes 0-7.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn lanes8(a: &[u8], b: &[u8], at: usize) -> __m512i {
        // Through general registers: sixteen bytes written as two halves and read back as one
        // would wait for the stores to retire.
        let low = i64::from_le_bytes(bytes::<8>(a, at));
        let high = i64::from_le_bytes(bytes::<8>(b, at));
        _mm512_cvtepu8_epi32(_mm_set_epi64x(high, low))
    }

    /// Sixteen bytes at `at` of each group as 16-bit values: group `a`'s in lanes 0-7.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn words16(a: &[u8], b: &[u8], at: usize) -> __m512i {
        _mm512_cvtepu8_epi16(sixteen_each(a, b, at))
    }

    /// Where [`super::products_q4k`] says: Q5_K where `FIVE`, else Q4_K; `ROWS` input rows,
    /// or any number (up to [`MAX_ROWS`]) where 0.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) fn q4k<const FIVE: bool, const ROWS: usize>(
        w: &[u8],
        input: &[InputSuper],
        supers: usize,
        dst: &mut [f32],
    ) {
        let rows = if ROWS > 0 { ROWS } else { input.len() / supers };
        let runs_at = if FIVE { Q5K_RUNS } else { Q4K_RUNS };
        let bytes = runs_at + 1024;
        let low = _mm512_set1_epi8(0x0f);
        let sixteen = _mm512_set1_epi8(0x10);
        let group_bytes = supers * bytes;
        for (two, dst) in w
            .chunks_exact(2 * group_bytes)
            .zip(dst.chunks_exact_mut(2 * GROUP * rows))
        {
            let (ga, gb) = two.split_at(group_bytes);
            let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
            for (i, (a, b)) in ga
                .chunks_exact(bytes)
                .zip(gb.chunks_exact(bytes))
                .enumerate()
            {
                prefetch(a, bytes);
                prefetch(b, bytes);
                let mut isum = [_mm512_setzero_si512(); MAX_ROWS];
                let mut msum = [_mm512_setzero_si512(); MAX_ROWS];
                for c in 0..4 {
                    let mut lo = [_mm512_setzero_si512(); 8];
                    let mut hi = [_mm512_setzero_si512(); 8];
                    for m in 0..8 {
                        let run = pair(a, b, runs_at + 256 * c + 32 * m);
                        lo[m] = _mm512_and_si512(run, low);
                        hi[m] = _mm512_and_si512(_mm512_srli_epi16::<4>(run), low);
                        if FIVE {
                            let bits = pair(a, b, FIFTH + 32 * m);
                            let bit_lo = _mm512_set1_epi8(1 << (2 * c));
                            let bit_hi = _mm512_set1_epi8((1u8 << (2 * c + 1)) as i8);
                            lo[m] = _mm512_mask_add_epi8(
                                lo[m],
                                _mm512_test_epi8_mask(bits, bit_lo),
                                lo[m],
                                sixteen,
                            );
                            hi[m] = _mm512_mask_add_epi8(
                                hi[m],
                                _mm512_test_epi8_mask(bits, bit_hi),
                                hi[m],
                                sixteen,
                            );
                        }
                    }
                    let sc_lo = lanes8(a, b, SCALES + GROUP * 2 * c);
                    let sc_hi = lanes8(a, b, SCALES + GROUP * (2 * c + 1));
                    let mins = words16(a, b, MINS + 16 * c);
                    for r in 0..rows {
                        let x = &input[r * supers + i];
                        let mut sl = _mm512_setzero_si512();
                        let mut sh = _mm512_setzero_si512();
                        for m in 0..8 {
                            let at = 64 * c + 4 * m;
                            sl = _mm512_dpbusd_epi32(sl, lo[m], four(&x.qs, at));
                            sh = _mm512_dpbusd_epi32(sh, hi[m], four(&x.qs, at + 32));
                        }
                        isum[r] = _mm512_add_epi32(
                            isum[r],
                            _mm512_add_epi32(
                                _mm512_mullo_epi32(sl, sc_lo),
                                _mm512_mullo_epi32(sh, sc_hi),
                            ),
                        );
                        msum[r] = _mm512_dpwssd_epi32(msum[r], mins, pair16(&x.subs, 2 * c));
                    }
                }
                let d = halves(a, b, D);
                let dmin = halves(a, b, DMIN);
                for r in 0..rows {
                    let xd = _mm512_set1_ps(input[r * supers + i].d);
                    acc[r] =
                        _mm512_fmadd_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(isum[r]), acc[r]);
                    acc[r] = _mm512_fnmadd_ps(
                        _mm512_mul_ps(dmin, xd),
                        _mm512_cvtepi32_ps(msum[r]),
                        acc[r],
                    );
                }
            }
            write(&acc, rows, dst);
        }
    }

    /// Sixteen bytes from `at` of each group, those of group `a` in the low half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn sixteen_each(a: &[u8], b: &[u8], at: usize) -> __m256i {
        let low: __m128i = bytemuck::cast(bytes::<16>(a, at));
        let high: __m128i = bytemuck::cast(bytes::<16>(b, at));
        _mm256_set_m128i(high, low)
    }

    /// The formats of sixteen sub-blocks of 16 values, scales by pairs: Q6_K (`BITS` 6),
    /// Q2_K (2) and Q3_K (3); `ROWS` as in [`q4k`].
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) fn sixteens<const BITS: u8, const ROWS: usize>(
        w: &[u8],
        input: &[InputSuper],
        supers: usize,
        dst: &mut [f32],
    ) {
        let rows = if ROWS > 0 { ROWS } else { input.len() / supers };
        let bytes = match BITS {
            6 => Q6_RUNS + 1536,
            2 => Q2_RUNS + 512,
            _ => Q3_RUNS + 512,
        };
        let low = _mm512_set1_epi8(0x0f);
        let top = _mm512_set1_epi8(0x30);
        let three = _mm512_set1_epi8(3);
        let four_v = _mm512_set1_epi8(4);
        let group_bytes = supers * bytes;
        for (two, dst) in w
            .chunks_exact(2 * group_bytes)
            .zip(dst.chunks_exact_mut(2 * GROUP * rows))
        {
            let (ga, gb) = two.split_at(group_bytes);
            let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
            for (i, (a, b)) in ga
                .chunks_exact(bytes)
                .zip(gb.chunks_exact(bytes))
                .enumerate()
            {
                prefetch(a, bytes);
                prefetch(b, bytes);
                // Lane `r` of pairs[u]: the scales of sub-blocks 2u and 2u + 1 of row `r` in
                // 16 bits (signed for Q6_K and Q3_K); for Q2_K, mins[u] their offsets.
                let mut pairs = [_mm512_setzero_si512(); 8];
                let mut mins = [_mm512_setzero_si512(); 8];
                for (u, (p, m)) in pairs.iter_mut().zip(&mut mins).enumerate() {
                    if BITS == 2 {
                        let raw = sixteen_each(a, b, Q2_SCALES + 16 * u);
                        let nibble = _mm256_set1_epi8(0x0f);
                        *p = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, nibble));
                        *m = _mm512_cvtepu8_epi16(_mm256_and_si256(
                            _mm256_srli_epi16::<4>(raw),
                            nibble,
                        ));
                    } else {
                        *p = _mm512_cvtepi8_epi16(sixteen_each(a, b, Q6_SCALES + 16 * u));
                    }
                }
                let mut isum = [_mm512_setzero_si512(); MAX_ROWS];
                for h in 0..2 {
                    for t in 0..2 {
                        // v[k][q]: positions 16t + 4k.. of quarter (or step) q of half h,
                        // every row, as unsigned values.
                        let mut v = [[_mm512_setzero_si512(); 4]; 4];
                        for (k, v) in v.iter_mut().enumerate() {
                            let n = 4 * t + k;
                            if BITS == 6 {
                                let at = Q6_RUNS + 96 * (8 * h + n);
                                let (x, c, hh) =
                                    (pair(a, b, at), pair(a, b, at + 32), pair(a, b, at + 64));
                                let x_high = _mm512_srli_epi16::<4>(x);
                                let c_high = _mm512_srli_epi16::<4>(c);
                                v[0] = _mm512_or_si512(
                                    _mm512_and_si512(x, low),
                                    _mm512_and_si512(_mm512_slli_epi16::<4>(hh), top),
                                );
                                v[1] = _mm512_or_si512(
                                    _mm512_and_si512(c, low),
                                    _mm512_and_si512(_mm512_slli_epi16::<2>(hh), top),
                                );
                                v[2] = _mm512_or_si512(
                                    _mm512_and_si512(x_high, low),
                                    _mm512_and_si512(hh, top),
                                );
                                v[3] = _mm512_or_si512(
                                    _mm512_and_si512(c_high, low),
                                    _mm512_and_si512(_mm512_srli_epi16::<2>(hh), top),
                                );
                            } else {
                                let runs = if BITS == 2 { Q2_RUNS } else { Q3_RUNS };
                                let q = pair(a, b, runs + 32 * (8 * h + n));
                                v[0] = _mm512_and_si512(q, three);
                                v[1] = _mm512_and_si512(_mm512_srli_epi16::<2>(q), three);
                                v[2] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), three);
                                v[3] = _mm512_and_si512(_mm512_srli_epi16::<6>(q), three);
                                if BITS == 3 {
                                    // Step 4h + q's third bit, as 4.
                                    let bits = pair(a, b, Q3_BITS + 32 * n);
                                    for (q, v) in v.iter_mut().enumerate() {
                                        let bit = _mm512_set1_epi8((1u8 << (4 * h + q)) as i8);
                                        *v = _mm512_mask_add_epi8(
                                            *v,
                                            _mm512_test_epi8_mask(bits, bit),
                                            *v,
                                            four_v,
                                        );
                                    }
                                }
                            }
                        }
                        // Quarter q's sub-block here is 8h + 2q + t: of pair 4h + q, the
                        // first (t = 0) or second of its two 16-bit scales, as 32 bits.
                        let mut scales = [_mm512_setzero_si512(); 4];
                        for (q, sc) in scales.iter_mut().enumerate() {
                            let p = pairs[4 * h + q];
                            *sc = if t == 0 {
                                _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(p))
                            } else {
                                _mm512_srai_epi32::<16>(p)
                            };
                        }
                        for (r, isum) in isum.iter_mut().enumerate().take(rows) {
                            let x = &input[r * supers + i];
                            for (q, sc) in scales.iter().enumerate() {
                                let base = 128 * h + 32 * q + 16 * t;
                                let mut sums = _mm512_setzero_si512();
                                for (k, v) in v.iter().enumerate() {
                                    sums =
                                        _mm512_dpbusd_epi32(sums, v[q], four(&x.qs, base + 4 * k));
                                }
                                *isum = _mm512_add_epi32(*isum, _mm512_mullo_epi32(sums, *sc));
                            }
                        }
                    }
                }
                // Each sub-block's scale (or for Q2_K its offset) times the input's sum of
                // its 16 values, two sub-blocks per 16-bit multiply-add: the values' centre
                // (32 for Q6_K, 4 for Q3_K), or Q2_K's offsets.
                let d = halves(a, b, 0);
                let dmin = halves(a, b, DMIN);
                for r in 0..rows {
                    let x = &input[r * supers + i];
                    let by = if BITS == 2 { &mins } else { &pairs };
                    let mut centre = _mm512_setzero_si512();
                    for (u, p) in by.iter().enumerate() {
                        centre = _mm512_dpwssd_epi32(centre, *p, pair16(&x.sums, 2 * u));
                    }
                    let xd = _mm512_set1_ps(x.d);
                    let sums = match BITS {
                        6 => _mm512_sub_epi32(isum[r], _mm512_slli_epi32::<5>(centre)),
                        3 => _mm512_sub_epi32(isum[r], _mm512_slli_epi32::<2>(centre)),
                        _ => isum[r],
                    };
                    acc[r] =
                        _mm512_fmadd_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(sums), acc[r]);
                    if BITS == 2 {
                        acc[r] = _mm512_fnmadd_ps(
                            _mm512_mul_ps(dmin, xd),
                            _mm512_cvtepi32_ps(centre),
                            acc[r],
                        );
                    }
                }
            }
            write(&acc, rows, dst);
        }
    }

    /// Each row's sixteen float lanes written out, output-major.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn write(acc: &[__m512; MAX_ROWS], rows: usize, dst: &mut [f32]) {
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let low: [f32; 8] = bytemuck::cast(_mm512_castps512_ps256(*acc));
            let high: [f32; 8] = bytemuck::cast(_mm512_extractf32x8_ps::<1>(*acc));
            for (o, v) in low.into_iter().chain(high).enumerate() {
                dst[o * rows + r] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::values;
    use super::super::super::{quantize_rows, quantize_rows_super};
    use super::super::tests::{PACKED, quantized};
    use super::super::{GROUP, pack, superblocks};
    use super::*;

    /// Every format this kernel takes, 1 to 16 input rows: the bits of the AVX2 kernel on
    /// the same packed matrix (whose own tests hold it to candle's references), for an even
    /// and an odd number of groups through the dispatch, and for pairs directly.
    #[test]
    fn vnni_products_have_the_avx2_kernels_bits() {
        if !detected() {
            // Said, not silent, and not a failure under CI either: a CPU without AVX-512 VNNI
            // runs the AVX2 path, whose own tests cover it.
            cluster_fixtures::note_skipped("this CPU has no AVX-512 VNNI");
            return;
        }
        let width = 512;
        for dtype in PACKED {
            let format = Format::of(dtype).unwrap();
            let outputs = 6 * GROUP;
            let weights = values(outputs * width, 11);
            let bytes = quantized(&weights, outputs, dtype)
                .data()
                .unwrap()
                .into_owned();
            let packed = pack(format, &bytes, width).unwrap();
            let super_format = format.block_values() == 256;
            let blocks = width / format.block_values();
            for rows in [1, 2, 3, 4, 5, 16] {
                let x = values(rows * width, 40 + rows as u32);
                let mut ours = vec![0f32; rows * outputs];
                let mut theirs = ours.clone();
                if super_format {
                    let input = quantize_rows_super(&x, width);
                    products_super(format, &packed, &input, blocks, &mut ours);
                    superblocks::products_avx2(format, &packed, &input, blocks, &mut theirs);
                } else {
                    let input = quantize_rows(format, &x, width);
                    products(format, &packed, &input, blocks, &mut ours);
                    super::super::products_avx2(format, &packed, &input, blocks, &mut theirs);
                }
                for (o, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{dtype:?} rows {rows} at {o}: VNNI {a} vs AVX2 {b}"
                    );
                }
                // Through the dispatch, with an odd number of groups (the last through AVX2).
                let odd = &packed[..packed.len() / 6 * 5];
                let mut through = vec![0f32; rows * 5 * GROUP];
                super::super::rows_times_packed(format, &x, rows, odd, width, &mut through);
                for r in 0..rows {
                    for o in 0..5 * GROUP {
                        let (a, b) = (through[r * 5 * GROUP + o], theirs[o * rows + r]);
                        assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} rows {rows} odd");
                    }
                }
            }
        }
    }
}
