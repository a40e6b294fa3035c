//! f16 weights widened by the CPU's own conversion instruction (F16C's `vcvtph2ps`, eight
//! values in one instruction), for x86 CPUs that have it: every x86 CPU with AVX2 since 2013.
//!
//! The portable path ([`super::PairWiden`] for f16) widens with about twenty integer and float
//! operations per sixteen weights; from memory that loop has too few loads in flight, and f16
//! decoded at a third of llama.cpp's speed on an Intel machine (0.76 on an AMD one). pulp, through
//! which the rest of the crate reaches SIMD safely, offers the conversion only with AVX-512
//! enabled for everything (its `x86-v4` feature, which would also move candle's gemm and every
//! other kernel of ours). So this module is one of two places in the workspace allowed `unsafe`
//! (the other is the agent's global allocator), and only for one call: entering the kernel,
//! compiled for AVX2, FMA and F16C, after checking that the CPU has them. Inside it the intrinsics are safe functions (Rust 1.87 made them so within
//! functions compiled for their features), and every load reads a checked slice through
//! `bytemuck`.
//!
//! A row's result takes the same steps whatever the batch, as in [`super`]; it differs from the
//! portable path's only in summation order (consecutive lanes here, even and odd elements there).
#![allow(unsafe_code)]

/// Whether [`block`] can run on this CPU.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One task of [`super::rows_times_weights`] over f16 weights (as their bits): `dst[o * rows + r]
/// = x[r] · w[o]` for every weight row `o` of `w` and input row `r` of `x`.
///
/// # Panics
/// When [`available`] is false, or the slices do not have those shapes.
pub(super) fn block(x: &[f32], rows: usize, w: &[u16], width: usize, dst: &mut [f32]) {
    assert!(available(), "F16C kernel called on a CPU without it");
    assert!(width > 0 && x.len() == rows * width && w.len().is_multiple_of(width));
    assert_eq!(dst.len(), w.len() / width * rows);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` checked just above that the CPU has AVX2, FMA and F16C, the features
    // `x86::block` is compiled for; it touches memory only through the slices it is given.
    unsafe {
        x86::block(x, rows, w, width, dst)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::{ROW_GROUP, input_group, weight_block};

    /// Eight f16 values (the bits in `h`, exactly eight) as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen8(h: &[u16]) -> __m256 {
        _mm256_cvtph_ps(bytemuck::pod_read_unaligned::<__m128i>(
            bytemuck::cast_slice(h),
        ))
    }

    /// Eight f32 values (`x`, exactly eight).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load8(x: &[f32]) -> __m256 {
        bytemuck::pod_read_unaligned::<__m256>(bytemuck::cast_slice(x))
    }

    /// The sum of the eight lanes: halves, then quarters, then the last pair.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sum8(v: __m256) -> f32 {
        let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        let one = _mm_add_ss(two, _mm_shuffle_ps::<0b01>(two, two));
        _mm_cvtss_f32(one)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn block(x: &[f32], rows: usize, w: &[u16], width: usize, dst: &mut [f32]) {
        // Blocks of weight rows that stay in L2 while every group of input rows (which stay in
        // L1) passes over them, as the portable path takes them. The loop is written out again
        // rather than shared: a shared one would take the product as a closure, and a closure
        // is compiled without this function's features.
        let (group, sub) = (input_group(width), weight_block(width, 2));
        for (w, dst) in w.chunks(sub * width).zip(dst.chunks_mut(sub * rows)) {
            let mut start = 0;
            while start < rows {
                let n = (rows - start).min(group);
                let xs = &x[start * width..(start + n) * width];
                for (w_row, dst) in w.chunks_exact(width).zip(dst.chunks_exact_mut(rows)) {
                    let dst = &mut dst[start..start + n];
                    match n {
                        1 => dot::<1>(w_row, xs, dst),
                        2 => dot::<2>(w_row, xs, dst),
                        3 => dot::<3>(w_row, xs, dst),
                        _ => dot::<ROW_GROUP>(w_row, xs, dst),
                    }
                }
                start += n;
            }
        }
    }

    /// Dot products of one f16 weight row with `G` input rows (`xs` holds them back to back):
    /// sixteen weights a step into two accumulators per row (so that consecutive fused
    /// multiply-adds do not wait on each other), a last eight into the first, the lanes summed,
    /// then the tail; the same steps for every `G`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot<const G: usize>(w_row: &[u16], xs: &[f32], dst: &mut [f32]) {
        let width = w_row.len();
        let x: [&[f32]; G] = std::array::from_fn(|g| &xs[g * width..(g + 1) * width]);
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        let mut chunks = w_row.chunks_exact(16);
        for (j, h) in chunks.by_ref().enumerate() {
            let (w0, w1) = (widen8(&h[..8]), widen8(&h[8..]));
            let at = 16 * j;
            for g in 0..G {
                let xg = &x[g][at..at + 16];
                acc[g][0] = _mm256_fmadd_ps(load8(&xg[..8]), w0, acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(load8(&xg[8..]), w1, acc[g][1]);
            }
        }
        let mut done = width - chunks.remainder().len();
        if width - done >= 8 {
            let w0 = widen8(&w_row[done..done + 8]);
            for g in 0..G {
                acc[g][0] = _mm256_fmadd_ps(load8(&x[g][done..done + 8]), w0, acc[g][0]);
            }
            done += 8;
        }
        for g in 0..G {
            let mut sum = sum8(_mm256_add_ps(acc[g][0], acc[g][1]));
            for (a, &b) in x[g][done..].iter().zip(&w_row[done..]) {
                sum += a * half::f16::from_bits(b).to_f32();
            }
            dst[g] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// The Rust sources under `dir`, build outputs and git's own files left out.
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    sources(&path, out);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn only_the_kernel_entries_and_the_allocator_are_allowed_unsafe() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = Vec::new();
        sources(&root, &mut files);
        assert!(files.len() > 50, "found only {} sources", files.len());
        let allowed: Vec<PathBuf> = files
            .into_iter()
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                text.contains(concat!("allow(", "unsafe_code)"))
            })
            .map(|f| f.canonicalize().unwrap())
            .collect();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut expected: Vec<PathBuf> = [
            manifest.join("src/matvec/f16c.rs"),
            // The AVX-512 VNNI products of packed block formats.
            manifest.join("src/qmatvec/packed/vnni.rs"),
            // The global allocator that advises huge pages, and the thread count it sets.
            manifest.join("../src/hugepages.rs"),
        ]
        .iter()
        .map(|f| f.canonicalize().unwrap())
        .collect();
        let mut allowed = allowed;
        allowed.sort();
        expected.sort();
        assert_eq!(allowed, expected, "modules allowed `unsafe`");
    }
}
