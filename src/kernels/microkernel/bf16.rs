//! The AVX512-BF16 forms of the micro-tiles ([`super::precision`](crate::kernels::precision)):
//! operands rounded to bfloat16 (round to nearest even, as `half::bf16::from_f32`), multiplied in
//! pairs by `vdpbf16ps` (`acc[i] += a[2i]·b[2i] + a[2i+1]·b[2i+1]`) into f32 sums.
//!
//! A "word" is two bf16 values in 32 bits, the lower one first. The grid tile's operands are
//! words of two consecutive rows of the reduction: weights `[rows/2][MR]` words, and per pair
//! of X rows the 16 positions' words; the dot products' operands are words of two consecutive
//! values of one row.

use std::arch::x86_64::*;

use super::MR;

/// The bf16 word of `(lo, hi)`, rounded as the hardware rounds (for the tests).
#[cfg(test)]
pub(in crate::kernels) fn word(lo: f32, hi: f32) -> u32 {
    u32::from(half::bf16::from_f32(lo).to_bits())
        | u32::from(half::bf16::from_f32(hi).to_bits()) << 16
}

#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Writes the 16 words of positions `0..16` of two rows: word `i` = `(lo[i], hi[i])`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; 16 floats readable at `lo` and at `hi`, 16 words writable at `dst`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(in crate::kernels) unsafe fn interleave16(lo: *const f32, hi: *const f32, dst: *mut u32) {
    const FIRST: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const SECOND: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
    // SAFETY: the caller's contract.
    unsafe {
        let (l, h) = (_mm512_loadu_ps(lo), _mm512_loadu_ps(hi));
        let idx = |v: &[i32; 16]| _mm512_loadu_si512(v.as_ptr().cast());
        let a = _mm512_permutex2var_ps(l, idx(&FIRST), h);
        let b = _mm512_permutex2var_ps(l, idx(&SECOND), h);
        // The second argument's 16 values come first.
        let w: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
        _mm512_storeu_si512(dst.cast(), w);
    }
}

/// Writes the 16 words of 32 consecutive floats: word `i` = `(src[2i], src[2i+1])`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; 32 floats readable at `src`, 16 words writable at `dst`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(in crate::kernels) unsafe fn pairs32(src: *const f32, dst: *mut u32) {
    // SAFETY: the caller's contract.
    unsafe {
        let (a, b) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
        let w: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
        _mm512_storeu_si512(dst.cast(), w);
    }
}

/// The bf16 form of [`super::avx512::tile`]: one 16-channel × 16-position tile over `kp`
/// pairs of X rows. Pair `j` is the 16 words at `x + off[j]`, and `a` is a weight panel of
/// `[kp][MR]` words. With `PF`, each pair prefetches the same pair of the next panel into L2.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `a` must hold `kp·MR` words and `x + off[j]` 16 words for every
/// `j < kp`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(in crate::kernels) unsafe fn tile<const PF: bool>(
    kp: usize,
    a: *const u32,
    x: *const u32,
    off: &[u32],
) -> [__m512; MR] {
    let mut acc = [_mm512_setzero_ps(); MR];
    for (j, &o) in off.iter().enumerate().take(kp) {
        // SAFETY: the caller bounds x + o + 16 and a + kp·MR.
        unsafe {
            let xv = bh(_mm512_loadu_si512(x.add(o as usize).cast()));
            let w = a.add(j * MR);
            if PF {
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(kp * MR) as *const i8);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = bh(_mm512_set1_epi32(*w.add(r) as i32));
                *acc = _mm512_dpbf16_ps(*acc, wv, xv);
            }
        }
    }
    acc
}

/// The 16 dot products of rows `u + i·n` with rows `v + j·n` (`i, j < 4`, `n` words each, a
/// multiple of 16) as 16-lane partial sums, accumulator `4i + j`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; 4 rows of `n` words at `u` and at `v`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(in crate::kernels) unsafe fn dot4x4(u: *const u32, v: *const u32, n: usize) -> [__m512; 16] {
    let mut acc = [_mm512_setzero_ps(); 16];
    let mut t = 0;
    while t < n {
        // SAFETY: the caller bounds all 8 rows.
        unsafe {
            let us: [__m512bh; 4] =
                std::array::from_fn(|i| bh(_mm512_loadu_si512(u.add(i * n + t).cast())));
            for j in 0..4 {
                let vj = bh(_mm512_loadu_si512(v.add(j * n + t).cast()));
                for (i, &ui) in us.iter().enumerate() {
                    acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], ui, vj);
                }
            }
        }
        t += 16;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa;

    /// The vector conversions give the words [`word`] gives, in the documented order, and a
    /// tile and a dot product sum the products of those rounded values.
    #[test]
    fn bf16_tiles_sum_rounded_products() {
        if isa::skip_without_bf16("bf16_tiles_sum_rounded_products") {
            return;
        }
        let r = crate::kernels::test_util::rand_vec(64, 7);
        let mut w = [0u32; 16];
        // SAFETY: AVX512-BF16 present; 16 floats per row, 16 words out.
        unsafe { interleave16(r.as_ptr(), r[16..].as_ptr(), w.as_mut_ptr()) };
        for i in 0..16 {
            assert_eq!(w[i], word(r[i], r[16 + i]), "interleave16 word {i}");
        }
        // SAFETY: as above, 32 floats in.
        unsafe { pairs32(r.as_ptr(), w.as_mut_ptr()) };
        for i in 0..16 {
            assert_eq!(w[i], word(r[2 * i], r[2 * i + 1]), "pairs32 word {i}");
        }
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        // A tile of one pair: acc[r][i] = a[r]·x_lo[i] + a'[r]·x_hi[i].
        let a: Vec<u32> = (0..MR).map(|i| word(r[32 + i], r[48 + i])).collect();
        let xw: Vec<u32> = (0..16).map(|i| word(r[i], r[16 + i])).collect();
        // SAFETY: one pair: MR weight words, 16 X words.
        let acc = unsafe { tile::<false>(1, a.as_ptr(), xw.as_ptr(), &[0]) };
        for (row, v) in acc.iter().enumerate() {
            let mut out = [0f32; 16];
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *v) };
            for (i, &o) in out.iter().enumerate() {
                let want = bf(r[32 + row]) * bf(r[i]) + bf(r[48 + row]) * bf(r[16 + i]);
                assert!(
                    (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "tile {row},{i}"
                );
            }
        }
        // Dot products of 4 x 4 rows of 16 words.
        let rows: Vec<u32> = (0..128).map(|i| word(r[i % 64], r[(i * 7) % 64])).collect();
        // SAFETY: 4 rows of 16 words at each pointer.
        let acc = unsafe { dot4x4(rows.as_ptr(), rows[64..].as_ptr(), 16) };
        let val = |w: u32| half::bf16::from_bits(w as u16).to_f32();
        let hi = |w: u32| half::bf16::from_bits((w >> 16) as u16).to_f32();
        for i in 0..4 {
            for j in 0..4 {
                let mut lanes = [0f32; 16];
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[4 * i + j]) };
                let got: f32 = lanes.iter().sum();
                let want: f32 = (0..16)
                    .map(|t| {
                        let (a, b) = (rows[i * 16 + t], rows[64 + j * 16 + t]);
                        val(a) * val(b) + hi(a) * hi(b)
                    })
                    .sum();
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "dot {i},{j}"
                );
            }
        }
    }
}
