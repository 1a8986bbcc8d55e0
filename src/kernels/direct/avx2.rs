//! The AVX2 micro-kernels of the direct convolution, for x86-64 CPUs without AVX-512 (with FMA
//! and F16C): the same packed panels, phase-plane layouts and few-positions plans as
//! [`super::avx512`] (and [`crate::kernels::microkernel`]), on 256-bit vectors.
//!
//! Both kernels vectorise over output channels: a 16-channel panel row is two vectors, and each
//! input value is broadcast against them. With 16 registers, a micro-tile holds at most 6
//! positions (12 sums, 2 weight vectors, 1 broadcast), so the grid kernel's tiles are
//! [`NR_AVX2`] positions wide and the few-positions kernel splits each tile of the plan (up to
//! [`FEW_POS`] positions) into parts of at most 6.

use std::arch::x86_64::*;

use super::{ConvGeom, FewPlan, Job, PackedWeights, PanelStore, SharedOut, NR_AVX2};
use crate::kernels::microkernel::{FewGeo, FewTap, FEW_POS, MR};

/// Positions per part of a few-positions tile.
const PART: usize = 6;

/// A number weight panels hold: 8 consecutive ones load as one vector of f32.
pub(super) trait Weight: Copy {
    /// # Safety
    /// AVX2 and F16C; `p` must point at 8 readable values.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Weight for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Weight for half::f16 {
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> __m256 {
        // SAFETY: the caller's contract (8 halves are 16 bytes); F16C converts them.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// One position's 16 channel sums as an array.
#[inline(always)]
fn lanes(v: &[__m256; 2]) -> [f32; MR] {
    let mut out = [0f32; MR];
    // SAFETY: 2 × 8 floats into 16.
    unsafe {
        _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
    }
    out
}

/// Computes grid tiles `t0..t1` of one job ([`NR_AVX2`] positions each) and stores them.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and no other thread may write the job's output block.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run_tiles(job: &Job, t0: usize, t1: usize, out: SharedOut) {
    let plane = job.g.oh * job.g.ow;
    let max_off = job.off.iter().copied().max().unwrap_or(0) as usize;
    assert_eq!(job.lay.nr, NR_AVX2, "direct conv: AVX2 tile width");
    assert!(job.a.len() >= job.kd * MR && job.off.len() == job.kd);
    assert!(
        t1 * NR_AVX2 + max_off <= job.x.len(),
        "direct conv: input slack"
    );
    assert!(job.out_base + (job.k0 + job.store.rows) * plane <= out.len());
    for t in t0..t1 {
        // SAFETY: every read is inside `job.x` (asserted: the largest offset plus the last
        // tile's end) and `job.a` (kd·MR floats).
        let acc = unsafe {
            tile(
                job.kd,
                job.a.as_ptr(),
                job.x.as_ptr().add(t * NR_AVX2),
                job.off,
            )
        };
        let (segs, n) = job.segments(t);
        for &(lane, len, o) in &segs[..n] {
            for (l, v) in acc[lane..lane + len].iter().enumerate() {
                let base = job.out_base + job.k0 * plane + o + l;
                // SAFETY: the job's rows at a valid output position (asserted above); this
                // job alone writes them.
                unsafe { job.store.put(&lanes(v), out, base, plane) };
            }
        }
    }
}

/// One tile of [`NR_AVX2`] grid positions × 16 output channels over all `kd` rows of X: row `j`
/// of X starts at `x + off[j]` (position `i` of the tile reads the float `i` further on), and
/// `a` is a weight panel `[kd][MR]`.
///
/// # Safety
/// AVX2 and FMA; `a` must hold `kd·MR` floats and `x + off[j]` [`NR_AVX2`] floats for every
/// `j < kd`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile(kd: usize, a: *const f32, x: *const f32, off: &[u32]) -> [[__m256; 2]; NR_AVX2] {
    let mut acc = [[_mm256_setzero_ps(); 2]; NR_AVX2];
    for (j, &o) in off.iter().enumerate().take(kd) {
        // SAFETY: the caller bounds a + kd·MR and x + o + NR_AVX2.
        unsafe {
            let w = a.add(j * MR);
            let (w0, w1) = (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)));
            let xo = x.add(o as usize);
            for (i, s) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*xo.add(i));
                s[0] = _mm256_fmadd_ps(v, w0, s[0]);
                s[1] = _mm256_fmadd_ps(v, w1, s[1]);
            }
        }
    }
    acc
}

/// The parts a few-positions tile of `len` positions is split into: `(first position, count)`,
/// as even as possible and at most [`PART`] each (12 → 6 + 6, 9 → 5 + 4, 4 → 4).
fn parts(len: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = len.div_ceil(PART).max(1);
    let (base, extra) = (len / n, len % n);
    (0..n).map(move |i| (i * base + i.min(extra), base + usize::from(i < extra)))
}

/// The few-positions kernel: every position of `plan` (images `n0..` of the batch, whose input
/// is `x`) for the `np` (1 or 2) weight panels from `p0` of `panels`, each tile in parts of at
/// most [`PART`] positions, each position's input value broadcast against a panel's 16 output
/// channels.
///
/// # Safety
/// AVX2, FMA and F16C; no other thread writes these output channels of these images.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run_few<W: Weight>(
    g: &ConvGeom,
    pw: &PackedWeights,
    panels: &[W],
    plan: &FewPlan,
    x: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    (p0, np): (usize, usize),
    n0: usize,
    out: SharedOut,
) {
    let plane = g.oh * g.ow;
    plan.check(g, x, out, n0, (p0, np));
    let panel = pw.kd() * MR;
    let a = &panels[p0 * panel..(p0 + np) * panel];
    // Each tile's sums: its positions for the first panel, then (with two) for the second.
    let mut acc = vec![[_mm256_setzero_ps(); 2]; np * plan.src.len()];
    for geo in FewGeo::blocks(g, pw.kd(), size_of::<W>()) {
        for t in &plan.tiles {
            let taps = &plan.taps[t.set];
            for j in 0..np {
                let acc = &mut acc[np * t.start + j * t.len..][..t.len];
                let a = &a[j * panel..];
                for (s, n) in parts(t.len) {
                    let src = &plan.src[t.start + s..t.start + s + n];
                    let acc = &mut acc[s..s + n];
                    // SAFETY: the reads are bounded (checked above); `a` holds the panel.
                    unsafe { few_part_any(acc, a, x, &geo, taps, src, t.masked, s) };
                }
            }
        }
    }
    for t in &plan.tiles {
        let dst = &plan.dst[t.start..t.start + t.len];
        for j in 0..np {
            let store = PanelStore::new(g, p0 + j, bias, relu);
            let out_base = n0 * g.k * plane + (p0 + j) * MR * plane;
            let acc = &acc[np * t.start + j * t.len..][..t.len];
            for (v, &d) in acc.iter().zip(dst) {
                // SAFETY: the panel's channels are below K and the position inside the chunk
                // (checked above); this item alone writes them.
                unsafe { store.put(&lanes(v), out, out_base + d, plane) };
            }
        }
    }
}

/// [`few_part`] exactly as wide as `src` (1 to [`PART`] positions).
///
/// # Safety
/// As for [`few_part`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_part_any<W: Weight>(
    acc: &mut [[__m256; 2]],
    a: &[W],
    x: &[f32],
    geo: &FewGeo,
    taps: &[FewTap],
    src: &[usize],
    masked: bool,
    shift: usize,
) {
    macro_rules! width {
        ($($p:literal)*) => {
            match (src.len(), masked) {
                $(
                    ($p, false) => few_part::<$p, false, W>(acc, a, x, geo, taps, src, shift),
                    ($p, true) => few_part::<$p, true, W>(acc, a, x, geo, taps, src, shift),
                )*
                (w, _) => panic!("few_part_any: {w} positions"),
            }
        };
    }
    const {
        assert!(
            PART == 6 && FEW_POS <= 16,
            "few_part_any instantiates widths 1..=6"
        )
    };
    // SAFETY: passed on.
    unsafe { width!(1 2 3 4 5 6) }
}

/// Adds to `acc` `P` output positions (input offsets `src`) × the 16 output channels of the
/// panel `a` (`[c][kk][MR]`) over the kernel taps `taps` of input channels `geo.chans`: each
/// tap's two weight vectors, each position's input value broadcast (channel `ci` at `ci·cl`).
/// With `MASKED`, a tap updates only the positions whose bit (position `i` of the part is bit
/// `shift + i` of the tile's mask) is set. Each weight load prefetches the weights `geo.pf`
/// values further on into L2.
///
/// # Safety
/// AVX2, FMA and F16C; `acc` and `src` hold `P` entries, `a` holds `c1·kk·MR` values (`c1` the
/// end of `geo.chans`), every tap index is below `kk`, and `x + q + ci·cl + o` is inside the
/// input for every `ci < c1` and every position `q` of `src` that tap offset `o` is applied to.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn few_part<const P: usize, const MASKED: bool, W: Weight>(
    acc: &mut [[__m256; 2]],
    a: &[W],
    x: &[f32],
    geo: &FewGeo,
    taps: &[FewTap],
    src: &[usize],
    shift: usize,
) {
    let (kk, pf) = (geo.kk, geo.pf);
    let q: [usize; P] = std::array::from_fn(|i| src[i]);
    let mut sum: [[__m256; 2]; P] = std::array::from_fn(|i| acc[i]);
    for ci in geo.chans.0..geo.chans.1 {
        // SAFETY: the caller bounds the weight and input reads.
        unsafe {
            let wc = a.as_ptr().add(ci * kk * MR);
            let xc = x.as_ptr().add(ci * geo.cl);
            for &(t, o, slots) in taps {
                let wp = wc.add(t * MR);
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(pf) as *const i8);
                let (w0, w1) = (W::load8(wp), W::load8(wp.add(8)));
                // A tap offset may be negative; only its sum with a position is an index.
                let xo = xc.wrapping_offset(o);
                let slots = slots >> shift;
                for (i, (&qp, s)) in q.iter().zip(sum.iter_mut()).enumerate() {
                    if !MASKED || slots >> i & 1 == 1 {
                        let v = _mm256_set1_ps(*xo.wrapping_add(qp));
                        s[0] = _mm256_fmadd_ps(v, w0, s[0]);
                        s[1] = _mm256_fmadd_ps(v, w1, s[1]);
                    }
                }
            }
        }
    }
    acc.copy_from_slice(&sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts cover the tile in order, none empty or wider than [`PART`].
    #[test]
    fn parts_cover_each_tile() {
        for len in 1..=FEW_POS {
            let p: Vec<_> = parts(len).collect();
            let mut next = 0;
            for &(s, n) in &p {
                assert_eq!(s, next, "len {len}: {p:?}");
                assert!((1..=PART).contains(&n), "len {len}: {p:?}");
                next += n;
            }
            assert_eq!(next, len);
        }
        assert_eq!(parts(12).collect::<Vec<_>>(), [(0, 6), (6, 6)]);
        assert_eq!(parts(9).collect::<Vec<_>>(), [(0, 5), (5, 4)]);
    }
}
