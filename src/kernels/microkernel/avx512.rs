//! The AVX-512 micro-tiles (see [`super`]).

use std::arch::x86_64::*;

use super::{FewGeo, FewTap, FEW_POS, MR};

/// A number weight panels hold: 16 consecutive ones load as one vector of f32.
pub(in crate::kernels) trait Weight: Copy {
    /// # Safety
    /// AVX-512F; `p` must point at 16 readable values.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Weight for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Weight for half::f16 {
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> __m512 {
        // SAFETY: the caller's contract (16 halves are 32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// The slots [`few_tile_any`] computes for `n` positions: `n`, but at least 4, so that
/// enough sums are in flight to hide the FMA latency.
pub(in crate::kernels) fn few_width(n: usize) -> usize {
    n.max(4)
}

/// [`few_tile`] exactly as wide as `src` ([`few_width`]; `acc` holds that many vectors per
/// panel): at batch 1 the maps of the last stages have 4 or 9 positions (and Winograd's
/// few-tiles GEMM 9 tiles), and a tile rounded up to 12 would spend a quarter or more of
/// its FMAs on copies. With `masked`, each tap updates only the slots of its mask; with
/// `pair`, two panels (`geo.panel` apart) run at once.
///
/// # Safety
/// As for [`few_tile`].
#[target_feature(enable = "avx512f")]
pub(in crate::kernels) unsafe fn few_tile_any<W: Weight>(
    acc: &mut [__m512],
    a: &[W],
    x: &[f32],
    geo: &FewGeo,
    taps: &[FewTap],
    src: &[usize],
    (masked, pair): (bool, bool),
) {
    macro_rules! width {
        ($($p:literal)*) => {
            match (few_width(src.len()), masked, pair) {
                $(
                    ($p, false, false) => few_tile::<$p, false, 1, W>(acc, a, x, geo, taps, src),
                    ($p, true, false) => few_tile::<$p, true, 1, W>(acc, a, x, geo, taps, src),
                    ($p, false, true) => few_tile::<$p, false, 2, W>(acc, a, x, geo, taps, src),
                    ($p, true, true) => few_tile::<$p, true, 2, W>(acc, a, x, geo, taps, src),
                )*
                (w, _, _) => panic!("few_tile_any: {w} positions"),
            }
        };
    }
    const { assert!(FEW_POS == 12, "few_tile_any instantiates widths 4..=12") };
    // SAFETY: passed on.
    unsafe { width!(4 5 6 7 8 9 10 11 12) }
}

/// Adds to `acc` `P` output positions (input offsets `src`, at most `P`; slots past them
/// repeat the last one) × 16 output channels of each of `G` panels over the kernel taps
/// `taps` of input channels `geo.chans`: each tap's weight vector from the panels `a`
/// (`[c][kk][MR]` each, `geo.panel` apart), each position's input value broadcast from
/// memory (channel `ci` at `ci·cl`) and used by all `G` panels. Panel `j`'s sums are
/// `acc[j·P..(j + 1)·P]`. With `MASKED`, a tap updates only the slots set in its mask. Each
/// weight load prefetches the weights `geo.pf` values further on into L2.
///
/// # Safety
/// AVX-512F; `acc` holds `G·P` vectors, `a` holds `(G − 1)·panel + c1·kk·MR` values (`c1`
/// the end of `geo.chans`), every tap index is below `kk`, and `x + q + ci·cl + o` is inside
/// the input for every `ci < c1` and every position `q` of `src` that tap offset `o` is
/// applied to (all of them, or with `MASKED` those of its slot mask).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn few_tile<const P: usize, const MASKED: bool, const G: usize, W: Weight>(
    acc: &mut [__m512],
    a: &[W],
    x: &[f32],
    geo: &FewGeo,
    taps: &[FewTap],
    src: &[usize],
) {
    let (kk, pf) = (geo.kk, geo.pf);
    let q: [usize; P] = std::array::from_fn(|i| src[i.min(src.len() - 1)]);
    let mut sum: [[__m512; P]; G] =
        std::array::from_fn(|j| std::array::from_fn(|i| acc[j * P + i]));
    for ci in geo.chans.0..geo.chans.1 {
        // SAFETY: the caller bounds the weight and input reads.
        unsafe {
            let wc = a.as_ptr().add(ci * kk * MR);
            let xc = x.as_ptr().add(ci * geo.cl);
            for &(t, o, slots) in taps {
                let w: [__m512; G] = std::array::from_fn(|j| {
                    let wp = wc.add(j * geo.panel + t * MR);
                    _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(pf) as *const i8);
                    W::load16(wp)
                });
                // A tap offset may be negative; only its sum with a position is an index.
                let xo = xc.wrapping_offset(o);
                for (i, &qp) in q.iter().enumerate() {
                    if !MASKED || slots >> i & 1 == 1 {
                        let v = _mm512_set1_ps(*xo.wrapping_add(qp));
                        for (sj, wj) in sum.iter_mut().zip(&w) {
                            sj[i] = _mm512_fmadd_ps(v, *wj, sj[i]);
                        }
                    }
                }
            }
        }
    }
    for (j, s) in sum.iter().enumerate() {
        acc[j * P..(j + 1) * P].copy_from_slice(s);
    }
}

/// One 16-channel × 16-position tile over all `kd` rows of X: row `j` of X is the 16 floats
/// at `x + off[j]`, and `a` is a weight panel `[kd][MR]`. With `PF`, each row prefetches the
/// same row of the next panel into L2 (for callers that go through the panels in order).
///
/// # Safety
/// AVX-512F; `a` must hold `kd·MR` floats and `x + off[j]` 16 floats for every `j < kd`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(in crate::kernels) unsafe fn tile<const PF: bool>(
    kd: usize,
    a: *const f32,
    x: *const f32,
    off: &[u32],
) -> [__m512; MR] {
    let mut acc = [_mm512_setzero_ps(); MR];
    for (j, &o) in off.iter().enumerate().take(kd) {
        // SAFETY: the caller bounds x + o + 16 and a + kd·MR.
        unsafe {
            let xv = _mm512_loadu_ps(x.add(o as usize));
            let w = a.add(j * MR);
            if PF {
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(kd * MR) as *const i8);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*w.add(r)), xv, *acc);
            }
        }
    }
    acc
}
