//! The AVX-512 drivers of the direct convolution: the grid kernel (16 output channels × 16
//! positions per tile) and the few-positions kernel (vectorised over output channels), each
//! running the shared micro-tiles of [`crate::kernels::microkernel::avx512`] and storing them.

use std::arch::x86_64::*;

use super::{ConvGeom, FewPlan, Job, PackedWeights, PanelStore, SharedOut, NR};
use crate::kernels::microkernel::avx512::{few_tile_any, few_width, tile, Weight};
use crate::kernels::microkernel::{FewGeo, MR};

/// Computes tiles `t0..t1` of one job and stores them.
///
/// # Safety
/// The CPU must support AVX-512F, and no other thread may write the job's output block.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn run_tiles(job: &Job, t0: usize, t1: usize, out: SharedOut) {
    let plane = job.g.oh * job.g.ow;
    let max_off = job.off.iter().copied().max().unwrap_or(0) as usize;
    assert!(job.a.len() >= job.kd * MR && job.off.len() == job.kd);
    assert_eq!(job.lay.nr, NR, "direct conv: AVX-512 tile width");
    assert!(t1 * NR + max_off <= job.x.len(), "direct conv: input slack");
    let st = &job.store;
    assert!(job.out_base + (job.k0 + st.rows) * plane <= out.len());
    let mut bias = [0f32; MR];
    if let Some(b) = st.bias {
        bias[..b.len()].copy_from_slice(b);
    }
    for t in t0..t1 {
        // SAFETY: every read is inside `job.x` (asserted: the largest offset plus the last
        // tile's end) and `job.a` (kd·MR floats).
        let acc =
            unsafe { tile::<false>(job.kd, job.a.as_ptr(), job.x.as_ptr().add(t * NR), job.off) };
        let mut vals = [_mm512_setzero_ps(); MR];
        for r in 0..st.rows {
            let mut v = _mm512_add_ps(acc[r], _mm512_set1_ps(bias[r]));
            if st.relu {
                v = _mm512_max_ps(v, _mm512_setzero_ps());
            }
            vals[r] = v;
        }
        let (segs, n) = job.segments(t);
        for &(lane, len, o) in &segs[..n] {
            let mask: __mmask16 = (((1u32 << len) - 1) << lane) as u16;
            for (r, v) in vals.iter().enumerate().take(st.rows) {
                let dst = job.out_base + (job.k0 + r) * plane + o;
                // SAFETY: lanes lane..lane+len go to dst..dst+len, inside this job's rows
                // (asserted above); masked-off lanes are not accessed.
                unsafe {
                    let p = out.ptr().wrapping_add(dst).wrapping_sub(lane);
                    _mm512_mask_storeu_ps(p, mask, *v);
                }
            }
        }
    }
}

/// The few-positions kernel: every position of `plan` (images `n0..` of the batch, whose
/// input is `x`) for the `np` (1 or 2) weight panels from `p0` of `panels`, one micro-tile of
/// up to [`FEW_POS`](crate::kernels::microkernel::FEW_POS) positions at a time, each position's input value broadcast (from
/// memory) against 16 output channels of weights per panel.
///
/// # Safety
/// AVX-512F; no other thread writes these output channels of these images.
#[target_feature(enable = "avx512f")]
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
    let a = &panels[p0 * pw.kd() * MR..(p0 + np) * pw.kd() * MR];
    // Each tile's sums: `n` slots of the first panel, then (with two) `n` of the second.
    let slots: Vec<usize> = plan.tiles.iter().map(|t| np * few_width(t.len)).collect();
    let mut acc = vec![_mm512_setzero_ps(); slots.iter().sum()];
    for geo in FewGeo::blocks(g, pw.kd(), size_of::<W>()) {
        let mut at = 0;
        for (t, &n) in plan.tiles.iter().zip(&slots) {
            let src = &plan.src[t.start..t.start + t.len];
            let taps = &plan.taps[t.set];
            let acc = &mut acc[at..at + n];
            at += n;
            // SAFETY: the reads are bounded (checked above); `a` holds np panels.
            unsafe { few_tile_any(acc, a, x, &geo, taps, src, (t.masked, np == 2)) };
        }
    }
    let mut at = 0;
    for (t, &n) in plan.tiles.iter().zip(&slots) {
        let dst = &plan.dst[t.start..t.start + t.len];
        for (j, acc) in acc[at..at + n].chunks(n / np).enumerate() {
            let store = PanelStore::new(g, p0 + j, bias, relu);
            let out_base = n0 * g.k * plane + (p0 + j) * MR * plane;
            for (v, &d) in acc.iter().zip(dst) {
                let mut lanes = [0f32; MR];
                // SAFETY: MR floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
                // SAFETY: the panel's channels are below K and the position inside the
                // chunk (checked above); this item alone writes them.
                unsafe { store.put(&lanes, out, out_base + d, plane) };
            }
        }
        at += n;
    }
}
