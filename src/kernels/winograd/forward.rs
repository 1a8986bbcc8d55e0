//! Winograd's forward convolution: weights transformed and packed once, tiles in blocks that
//! stay in L2, each block's input transform, GEMMs and output transform (see [`super`]).

use rayon::prelude::*;

use super::applicable;
use super::transform::{for_each, padded_planes, xi_stride, Scratch, Tiles, G2, G4};
use crate::kernels::geom::{ConvGeom, SharedOut};
use crate::kernels::isa;
#[cfg(target_arch = "x86_64")]
use crate::kernels::microkernel::bf16::interleave16;
use crate::kernels::microkernel::{panel_pair, FEW_POS, MR};

/// Transformed weights `U_ξ (K, C)` for the `(m+2)²` positions ξ of F(m x m, 3x3), each in
/// panels of [`MR`] channels.
#[derive(Debug, Clone)]
pub struct PackedWinograd {
    pub k: usize,
    pub c: usize,
    /// Output tile size: 2 or 4.
    pub m: usize,
    /// `[ξ][panel][c][MR]`.
    data: Vec<f32>,
    /// The same as bf16 words of channel pairs, `[ξ][panel][c/2][MR]`, where the GEMMs run in
    /// bf16 ([`Self::with_bf16`]).
    words: Option<Vec<u32>>,
}

impl PackedWinograd {
    /// Transforms (`U = G g Gᵀ`, in f64) and packs `(k, c, 3, 3)` weights for tiles of `m` (2 or 4).
    pub fn pack(w: &[f32], k: usize, c: usize, m: usize) -> Self {
        assert_eq!(w.len(), k * c * 9, "winograd pack: weight length");
        let gm: &[[f64; 3]] = match m {
            2 => &G2,
            4 => &G4,
            _ => panic!("winograd: tile size {m} (2 or 4)"),
        };
        let a = m + 2;
        let panels = k.div_ceil(MR);
        let mut data = vec![0f32; a * a * panels * c * MR];
        // One block of U per position ξ = (i, j): u = Σ_yx G[i][y]·g[y][x]·G[j][x]. Training packs
        // every step, so the blocks are filled in parallel.
        data.par_chunks_mut(panels * c * MR)
            .enumerate()
            .for_each(|(xi, blk)| {
                let (gi, gj) = (&gm[xi / a], &gm[xi % a]);
                for o in 0..k {
                    for ci in 0..c {
                        let g = &w[(o * c + ci) * 9..][..9];
                        let mut u = 0f64;
                        for (y, &gy) in gi.iter().enumerate() {
                            for (x, &gx) in gj.iter().enumerate() {
                                u += gy * g[y * 3 + x] as f64 * gx;
                            }
                        }
                        blk[((o / MR) * c + ci) * MR + o % MR] = u as f32;
                    }
                }
            });
        Self {
            k,
            c,
            m,
            data,
            words: None,
        }
    }

    /// These weights with bf16 words beside them: [`conv_forward`] then runs its GEMMs in bf16
    /// (see [`crate::kernels::precision`]). Training packs every step, so the blocks are
    /// converted in parallel, 16 words at a time. Panics for an odd channel count or without
    /// AVX512-BF16.
    pub fn with_bf16(mut self) -> Self {
        assert!(self.c.is_multiple_of(2), "winograd bf16: odd channel count");
        assert!(isa::avx512_bf16(), "winograd bf16: no AVX512-BF16");
        let half = self.c / 2;
        let mut words = vec![0u32; self.data.len() / 2];
        let blocks = self.data.par_chunks_exact(self.c * MR);
        #[cfg(target_arch = "x86_64")]
        blocks
            .zip(words.par_chunks_exact_mut(half * MR))
            .for_each(|(src, dst)| {
                for cp in 0..half {
                    let (lo, hi) = (&src[2 * cp * MR..][..MR], &src[(2 * cp + 1) * MR..][..MR]);
                    let out = &mut dst[cp * MR..][..MR];
                    // SAFETY: AVX512-BF16 asserted; MR (16) floats per row and MR words out.
                    unsafe { interleave16(lo.as_ptr(), hi.as_ptr(), out.as_mut_ptr()) };
                }
            });
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (blocks, half);
        self.words = Some(words);
        self
    }

    /// Positions ξ of the transformed tile, `(m+2)²`.
    fn xis(&self) -> usize {
        (self.m + 2) * (self.m + 2)
    }

    fn panels(&self) -> usize {
        self.k.div_ceil(MR)
    }

    fn panel(&self, xi: usize, p: usize) -> &[f32] {
        self.panel_run(xi, p, 1)
    }

    /// Panel `p` of position ξ as bf16 words (`c/2·MR`), if packed.
    fn panel_words(&self, xi: usize, p: usize) -> Option<&[u32]> {
        let len = self.c / 2 * MR;
        let words = self.words.as_ref()?;
        Some(&words[(xi * self.panels() + p) * len..][..len])
    }

    /// Panels `p..p + n` of position ξ, one after the other (`c·MR` floats each).
    fn panel_run(&self, xi: usize, p: usize, n: usize) -> &[f32] {
        let len = self.c * MR;
        assert!(p + n <= self.panels());
        &self.data[(xi * self.panels() + p) * len..][..n * len]
    }
}

/// `relu?(conv3x3(x, w) + bias)` with stride 1 and padding 1, `x (b, c, h, w)` → `(b, k, h, w)`.
/// With bf16 words in `pw` ([`PackedWinograd::with_bf16`]), the GEMMs over 16 tiles at a time
/// run in bf16 (the few-tiles form stays f32).
///
/// Panics unless [`applicable`], AVX-512 (and for bf16 words AVX512-BF16) is present and the
/// sizes agree.
pub fn conv_forward(
    g: &ConvGeom,
    x: &[f32],
    pw: &PackedWinograd,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    assert!(applicable(g) && isa::avx512());
    assert!(pw.words.is_none() || isa::avx512_bf16());
    assert_eq!((pw.k, pw.c), (g.k, g.c));
    assert_eq!(x.len(), g.input_len());
    assert!(bias.is_none_or(|b| b.len() == g.k));
    let tl = Tiles::new(g, pw.m);

    let xp = &padded_planes(x, (g.h, g.w), (tl.hp, tl.wp), 1)[..];

    let mut y = vec![0f32; g.output_len()];
    let out = SharedOut::new(&mut y);
    let mut bias_v = vec![0f32; g.k];
    if let Some(b) = bias {
        bias_v.copy_from_slice(b);
    }

    // Block size: V and M of a block ((m+2)²·(C+K) floats per tile) within about 1.5 MiB, and
    // at least four blocks per core where that leaves 16 tiles per block.
    let threads = rayon::current_num_threads().max(1);
    let fit = (1536 * 1024 / 4) / (pw.xis() * (g.c + g.k));
    let spread = tl.total.div_ceil(4 * threads);
    let tb = (fit.min(spread) / 16 * 16).max(16);
    let blocks = tl.total.div_ceil(tb);
    let ctx = Ctx {
        g,
        tl: &tl,
        xp,
        pw,
        bias: &bias_v,
        relu,
        out,
    };
    if blocks >= 2 * threads {
        (0..blocks).into_par_iter().for_each(|bi| {
            let (t0, t1) = (bi * tb, ((bi + 1) * tb).min(tl.total));
            ctx.block(t0, t1, false);
        });
    } else {
        for bi in 0..blocks {
            let (t0, t1) = (bi * tb, ((bi + 1) * tb).min(tl.total));
            ctx.block(t0, t1, true);
        }
    }
    y
}

struct Ctx<'a> {
    g: &'a ConvGeom,
    tl: &'a Tiles,
    xp: &'a [f32],
    pw: &'a PackedWinograd,
    bias: &'a [f32],
    relu: bool,
    out: SharedOut,
}

impl Ctx<'_> {
    /// All three stages for tiles `t0..t1`.
    fn block(&self, t0: usize, t1: usize, par: bool) {
        let (g, tl) = (self.g, self.tl);
        let ntp = (t1 - t0).div_ceil(16) * 16;
        let xis = self.pw.xis();
        // Lanes past t1 in the last vector hold stale (initialised) values; they only reach M
        // lanes that the output transform never stores.
        let (v_len, m_len) = (xis * xi_stride(g.c, ntp), xis * xi_stride(g.k, ntp));
        let mut v_buf = Scratch::take(v_len);
        let mut m_buf = Scratch::take(m_len);
        let v = &mut v_buf.buf[..v_len];
        let m = &mut m_buf.buf[..m_len];
        let vs = SharedOut::new(v);
        let ms = SharedOut::new(m);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (vs, ms, par);
        // SAFETY (all three stages): AVX-512F is present (asserted by `conv_forward`); each
        // parallel item writes a disjoint part of its buffer (one input channel of V; one
        // (ξ, panel, vector) block of M; one output channel), every index bounded by asserts.
        #[cfg(target_arch = "x86_64")]
        for_each(g.c, par, |c| unsafe {
            match tl.m {
                2 => avx512::input2(tl, self.xp, g.c, c, t0, t1, ntp, vs),
                _ => avx512::input4(tl, self.xp, g.c, c, t0, t1, ntp, vs),
            }
        });
        let panels = self.pw.panels();
        let n = t1 - t0;
        if !n.is_multiple_of(16) && n <= 48 {
            // Few tiles that leave vector lanes idle (9 at batch 1 on 12x12 maps with F(4x4),
            // 7 of 16 lanes): vectorise over output channels instead, in micro-tiles of up to
            // FEW_POS tiles (the 12x12 layer 15% faster at batch 1, `conv_gflops`).
            // Two panels per item, as in the direct few-positions kernel.
            let parts = n.div_ceil(FEW_POS);
            let pairs = panels.div_ceil(2);
            let v = &*v;
            #[cfg(target_arch = "x86_64")]
            for_each(xis * pairs * parts, par, |i| {
                let (xi, pair, part) = (i / (pairs * parts), (i / parts) % pairs, i % parts);
                let (a, b) = (part * FEW_POS, ((part + 1) * FEW_POS).min(n));
                let (p, np) = panel_pair(panels, pair);
                unsafe { avx512::gemm_few(self, xi, (p, np), (a, b), v, ntp, ms) }
            });
        } else if self.pw.words.is_some() {
            self.gemm_bf16(v, ntp, ms, par);
        } else {
            let vecs = ntp / 16;
            let off: Vec<u32> = (0..g.c).map(|c| (c * ntp) as u32).collect();
            let (v, off) = (&*v, &off);
            #[cfg(target_arch = "x86_64")]
            for_each(xis * panels * vecs, par, |i| {
                let (xi, p, tv) = (i / (panels * vecs), (i / vecs) % panels, i % vecs);
                unsafe { avx512::gemm(self, xi, p, tv, v, off, ntp, ms) }
            });
        }
        let m = &*m;
        #[cfg(target_arch = "x86_64")]
        for_each(g.k, par, |k| unsafe {
            match tl.m {
                2 => avx512::output2(self, m, k, t0, t1, ntp),
                _ => avx512::output4(self, m, k, t0, t1, ntp),
            }
        });
    }

    /// The GEMM stage in bf16: V (`[ξ][c][ntp]`) rounded into words of channel pairs
    /// (`[ξ][c/2][ntp]`), then the bf16 grid tile per (ξ, panel, tile vector) into `m`.
    fn gemm_bf16(&self, v: &[f32], ntp: usize, ms: SharedOut, par: bool) {
        let (c, xis, panels) = (self.g.c, self.pw.xis(), self.pw.panels());
        let half = c / 2;
        let stride = xi_stride(half, ntp);
        // Words in a float scratch buffer (both are 32 bits).
        let mut w_buf = Scratch::take(xis * stride);
        let ws = SharedOut::new(&mut w_buf.buf[..xis * stride]);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (v, ms, par, ws, panels);
        // SAFETY: AVX512-BF16 is present (asserted by `conv_forward`); each item writes one
        // (ξ, channel pair) row of words, inside the buffer (asserted).
        #[cfg(target_arch = "x86_64")]
        for_each(xis * half, par, |i| unsafe {
            let (xi, cp) = (i / half, i % half);
            let src = xi * xi_stride(c, ntp) + 2 * cp * ntp;
            let dst = xi * stride + cp * ntp;
            assert!(src + ntp + ntp <= v.len() && dst + ntp <= ws.len());
            for t in (0..ntp).step_by(16) {
                let (lo, hi) = (v.as_ptr().add(src + t), v.as_ptr().add(src + ntp + t));
                interleave16(lo, hi, ws.ptr().add(dst + t).cast());
            }
        });
        let vecs = ntp / 16;
        let off: Vec<u32> = (0..half).map(|cp| (cp * ntp) as u32).collect();
        let words: &[f32] = &w_buf.buf[..xis * stride];
        #[cfg(target_arch = "x86_64")]
        for_each(xis * panels * vecs, par, |i| {
            let (xi, p, tv) = (i / (panels * vecs), (i / vecs) % panels, i % vecs);
            // SAFETY: as for the f32 GEMM; AVX512-BF16 present.
            unsafe { bf16::gemm(self, xi, p, tv, words, &off, ntp, ms) }
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod bf16 {
    use super::avx512::store_panel;
    use super::{xi_stride, Ctx, SharedOut, MR};
    use crate::kernels::microkernel::bf16::tile;

    /// [`super::avx512::gemm`] on bf16 words: `words` holds `[ξ][c/2][ntp]` words of V.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16; no other thread writes this (ξ, panel, vector) block of `m`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        ctx: &Ctx,
        xi: usize,
        p: usize,
        tv: usize,
        words: &[f32],
        off: &[u32],
        ntp: usize,
        m: SharedOut,
    ) {
        let half = ctx.g.c / 2;
        let a = ctx.pw.panel_words(xi, p).expect("bf16 words packed");
        let xw = &words[xi * xi_stride(half, ntp)..][..half * ntp];
        assert!(a.len() == half * MR && off.len() == half);
        assert!((half - 1) * ntp + tv * 16 + 16 <= xw.len());
        // SAFETY: bounds asserted above (a word is one float's 32 bits).
        let acc = unsafe { tile::<true>(half, a.as_ptr(), xw.as_ptr().add(tv * 16).cast(), off) };
        // SAFETY: the caller's contract.
        unsafe { store_panel(ctx, xi, p, tv, ntp, m, &acc) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{xi_stride, Ctx, SharedOut, MR};
    use crate::kernels::microkernel::avx512::{few_tile_any, few_width, tile};
    use crate::kernels::microkernel::{FewGeo, ALL_SLOTS, FEW_POS};
    use crate::kernels::winograd::transform::avx512::idx;
    pub(super) use crate::kernels::winograd::transform::avx512::{input2, input4};

    const INTERLEAVE_LO: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const INTERLEAVE_HI: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

    /// The `A x A` transformed outputs `M_ξ` of channel `k` for tile vector `tv`.
    #[target_feature(enable = "avx512f")]
    fn load_m<const A: usize>(
        m: &[f32],
        channels: usize,
        k: usize,
        ntp: usize,
        tv: usize,
    ) -> [[__m512; A]; A] {
        let mut mm = [[_mm512_setzero_ps(); A]; A];
        for (i, row) in mm.iter_mut().enumerate() {
            for (j, val) in row.iter_mut().enumerate() {
                let at = (i * A + j) * xi_stride(channels, ntp) + k * ntp + tv * 16;
                assert!(at + 16 <= m.len());
                // SAFETY: asserted in bounds.
                *val = unsafe { _mm512_loadu_ps(m.as_ptr().add(at)) };
            }
        }
        mm
    }

    /// Stores output channel `k` of tiles `tstart..tend` (at most 16, one per lane): `rows[dy]`
    /// holds output row `dy` of every tile as `M` vectors, the `M` columns of tile `lane` at floats
    /// `M·lane ..` of their concatenation (interleaved by the caller).
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `k` of these tiles.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tiles<const M: usize>(
        ctx: &Ctx,
        k: usize,
        tstart: usize,
        tend: usize,
        rows: &[[__m512; M]; M],
    ) {
        let g = ctx.g;
        for (t, n, ty, tx, len) in ctx.tl.runs(tstart, tend) {
            let lane = t - tstart;
            // Floats M·lane .. M·lane + ncols of a row go to columns M·tx ...
            let ncols = (M * len).min(g.ow - M * tx);
            let (f0, f1) = (M * lane, M * lane + ncols);
            for (dy, parts) in rows.iter().enumerate() {
                let oy = M * ty + dy;
                if oy >= g.oh {
                    continue;
                }
                let row = ((n * g.k + k) * g.oh + oy) * g.ow + M * tx;
                for (h, part) in parts.iter().enumerate() {
                    let (a, b) = (f0.max(16 * h), f1.min(16 * (h + 1)));
                    if a >= b {
                        continue;
                    }
                    let mask: __mmask16 =
                        ((((1u32 << (b - a)) - 1) << (a - 16 * h)) & 0xffff) as u16;
                    // Float f of this part goes to row + f − f0; lanes outside a..b are masked.
                    let p = ctx.out.ptr().wrapping_add(row + 16 * h).wrapping_sub(f0);
                    // SAFETY: columns M·tx .. M·tx + ncols <= ow of row oy, channel k, image n:
                    // inside the output (the callers assert its size) and owned by this item.
                    unsafe { _mm512_mask_storeu_ps(p, mask, *part) };
                }
            }
        }
    }

    /// `M_ξ` rows of panel `p`, tile vector `tv`. A thread's items run through the panels in
    /// memory order, so the micro-kernel prefetches the next panel (3x3 stem: 4–6% faster at
    /// batch 1 and 8).
    ///
    /// # Safety
    /// AVX-512F; no other thread writes this (ξ, panel, vector) block of `m`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        ctx: &Ctx,
        xi: usize,
        p: usize,
        tv: usize,
        v: &[f32],
        off: &[u32],
        ntp: usize,
        m: SharedOut,
    ) {
        let c = ctx.g.c;
        let a = ctx.pw.panel(xi, p);
        let xv = &v[xi * xi_stride(c, ntp)..][..c * ntp];
        assert!(a.len() == c * MR && off.len() == c);
        assert!((c - 1) * ntp + tv * 16 + 16 <= xv.len());
        // SAFETY: bounds asserted above.
        let acc = unsafe { tile::<true>(c, a.as_ptr(), xv.as_ptr().add(tv * 16), off) };
        // SAFETY: the caller's contract.
        unsafe { store_panel(ctx, xi, p, tv, ntp, m, &acc) };
    }

    /// Stores a grid tile's sums `acc` (the 16 tiles of vector `tv` × the output channels of
    /// panel `p` that K holds) into `M_ξ`.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes this (ξ, panel, vector) block of `m`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_panel(
        ctx: &Ctx,
        xi: usize,
        p: usize,
        tv: usize,
        ntp: usize,
        m: SharedOut,
        acc: &[__m512; MR],
    ) {
        let k = ctx.g.k;
        let rows = MR.min(k - p * MR);
        let mb = xi * xi_stride(k, ntp) + p * MR * ntp;
        assert!(mb + rows * ntp <= m.len());
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let dst = mb + r * ntp + tv * 16;
            // SAFETY: asserted in bounds; this block belongs to this item.
            unsafe { _mm512_storeu_ps(m.ptr().add(dst), *acc) };
        }
    }

    /// `M_ξ` rows of the `np` (1 or 2) panels from `p` for tiles `a..b` (at most [`FEW_POS`]),
    /// vectorised over each panel's 16 output channels, each tile's `V` value broadcast once
    /// for both panels.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes this (ξ, panels, tiles) block of `m`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm_few(
        ctx: &Ctx,
        xi: usize,
        (p, np): (usize, usize),
        (a, b): (usize, usize),
        v: &[f32],
        ntp: usize,
        m: SharedOut,
    ) {
        let (c, k) = (ctx.g.c, ctx.g.k);
        assert!((1..=2).contains(&np));
        let w = ctx.pw.panel_run(xi, p, np);
        let xv = &v[xi * xi_stride(c, ntp)..][..c * ntp];
        assert!(a < b && b - a <= FEW_POS && b <= ntp);
        let src: [usize; FEW_POS] = std::array::from_fn(|i| a + i);
        let src = &src[..b - a];
        let width = few_width(b - a);
        let mut acc = [_mm512_setzero_ps(); 2 * FEW_POS];
        let geo = FewGeo {
            chans: (0, c),
            kk: 1,
            cl: ntp,
            pf: np * c * MR,
            panel: c * MR,
        };
        let taps = [(0, 0isize, ALL_SLOTS)];
        // SAFETY: the panels hold np·c·MR floats; tile t < ntp of channel ci < c is inside xv.
        unsafe { few_tile_any(&mut acc, w, xv, &geo, &taps, src, (false, np == 2)) };
        for j in 0..np {
            let rows = MR.min(k - (p + j) * MR);
            let mb = xi * xi_stride(k, ntp) + (p + j) * MR * ntp;
            assert!(mb + rows * ntp <= m.len());
            for (t, v) in (a..b).zip(&acc[j * width..]) {
                let mut lanes = [0f32; MR];
                // SAFETY: MR floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
                for (r, val) in lanes.iter().enumerate().take(rows) {
                    // SAFETY: asserted in bounds; this block belongs to this item.
                    unsafe { *m.ptr().add(mb + r * ntp + t) = *val };
                }
            }
        }
    }

    /// Output channel `k` of tiles `t0..t1`: `Aᵀ M A`, bias, ReLU, stored into NCHW.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `k` of these tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output2(ctx: &Ctx, m: &[f32], k: usize, t0: usize, t1: usize, ntp: usize) {
        let g = ctx.g;
        let (lo, hi) = (idx(&INTERLEAVE_LO), idx(&INTERLEAVE_HI));
        let bias = _mm512_set1_ps(ctx.bias[k]);
        assert!(16 * xi_stride(g.k, ntp) <= m.len());
        assert!(g.b * g.k * g.oh * g.ow <= ctx.out.len());
        let mut tv = 0;
        while tv * 16 < t1 - t0 {
            let mm = load_m::<4>(m, g.k, k, ntp, tv);
            // Aᵀ = [1 1 1 0; 0 1 −1 −1] on both sides.
            let mut s = [[_mm512_setzero_ps(); 4]; 2];
            for j in 0..4 {
                s[0][j] = _mm512_add_ps(_mm512_add_ps(mm[0][j], mm[1][j]), mm[2][j]);
                s[1][j] = _mm512_sub_ps(_mm512_sub_ps(mm[1][j], mm[2][j]), mm[3][j]);
            }
            let mut ys = [[_mm512_setzero_ps(); 2]; 2];
            for (i, r) in s.iter().enumerate() {
                let y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]), bias);
                let y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]), bias);
                ys[i] = if ctx.relu {
                    let z = _mm512_setzero_ps();
                    [_mm512_max_ps(y0, z), _mm512_max_ps(y1, z)]
                } else {
                    [y0, y1]
                };
            }
            // Interleave (y·0, y·1) of 16 tiles into 32 consecutive output columns.
            let rows = [
                [
                    _mm512_permutex2var_ps(ys[0][0], lo, ys[0][1]),
                    _mm512_permutex2var_ps(ys[0][0], hi, ys[0][1]),
                ],
                [
                    _mm512_permutex2var_ps(ys[1][0], lo, ys[1][1]),
                    _mm512_permutex2var_ps(ys[1][0], hi, ys[1][1]),
                ],
            ];
            let tstart = t0 + tv * 16;
            // SAFETY: AVX-512F (this function's); channel k belongs to this item.
            unsafe { store_tiles(ctx, k, tstart, (tstart + 16).min(t1), &rows) };
            tv += 1;
        }
    }

    /// Interleave 64-bit pairs: `[a0 b0 a1 b1 a2 b2 a3 b3]` and the upper half.
    const PAIRS_LO: [i64; 8] = [0, 8, 1, 9, 2, 10, 3, 11];
    const PAIRS_HI: [i64; 8] = [4, 12, 5, 13, 6, 14, 7, 15];

    #[target_feature(enable = "avx512f")]
    fn idx64(v: &[i64; 8]) -> __m512i {
        // SAFETY: 8 i64 are 64 bytes.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

    /// `Aᵀ m` along one axis for F(4x4,3x3):
    /// `Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0; 0 1 −1 8 −8 1]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn at6(m: [__m512; 6]) -> [__m512; 4] {
        let (a, b) = (_mm512_add_ps(m[1], m[2]), _mm512_sub_ps(m[1], m[2]));
        let (c, d) = (_mm512_add_ps(m[3], m[4]), _mm512_sub_ps(m[3], m[4]));
        [
            _mm512_add_ps(_mm512_add_ps(m[0], a), c),
            _mm512_fmadd_ps(_mm512_set1_ps(2.0), d, b),
            _mm512_fmadd_ps(_mm512_set1_ps(4.0), c, a),
            _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0), d, b), m[5]),
        ]
    }

    /// [`output2`] for F(4x4,3x3).
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `k` of these tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output4(ctx: &Ctx, m: &[f32], k: usize, t0: usize, t1: usize, ntp: usize) {
        let g = ctx.g;
        let (lo, hi) = (idx(&INTERLEAVE_LO), idx(&INTERLEAVE_HI));
        let (plo, phi) = (idx64(&PAIRS_LO), idx64(&PAIRS_HI));
        let bias = _mm512_set1_ps(ctx.bias[k]);
        assert!(36 * xi_stride(g.k, ntp) <= m.len());
        assert!(g.b * g.k * g.oh * g.ow <= ctx.out.len());
        let mut tv = 0;
        while tv * 16 < t1 - t0 {
            let mm = load_m::<6>(m, g.k, k, ntp, tv);
            // Aᵀ M A: columns of each row (6 rows → 6x4), then rows (→ 4x4).
            let mut cols = [[_mm512_setzero_ps(); 4]; 6];
            for (c, mi) in cols.iter_mut().zip(mm) {
                *c = at6(mi);
            }
            let mut out_rows = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..4 {
                let r = at6([
                    cols[0][j], cols[1][j], cols[2][j], cols[3][j], cols[4][j], cols[5][j],
                ]);
                for (i, v) in r.into_iter().enumerate() {
                    let v = _mm512_add_ps(v, bias);
                    out_rows[i][j] = if ctx.relu {
                        _mm512_max_ps(v, _mm512_setzero_ps())
                    } else {
                        v
                    };
                }
            }
            // Interleave the 4 columns of 16 tiles into 64 consecutive output floats per row:
            // pairs (c0, c1) and (c2, c3) first, then those pairs two by two.
            let mut rows = [[_mm512_setzero_ps(); 4]; 4];
            for (dst, c) in rows.iter_mut().zip(out_rows) {
                let p = [
                    _mm512_castps_pd(_mm512_permutex2var_ps(c[0], lo, c[1])),
                    _mm512_castps_pd(_mm512_permutex2var_ps(c[0], hi, c[1])),
                ];
                let q = [
                    _mm512_castps_pd(_mm512_permutex2var_ps(c[2], lo, c[3])),
                    _mm512_castps_pd(_mm512_permutex2var_ps(c[2], hi, c[3])),
                ];
                *dst = [
                    _mm512_castpd_ps(_mm512_permutex2var_pd(p[0], plo, q[0])),
                    _mm512_castpd_ps(_mm512_permutex2var_pd(p[0], phi, q[0])),
                    _mm512_castpd_ps(_mm512_permutex2var_pd(p[1], plo, q[1])),
                    _mm512_castpd_ps(_mm512_permutex2var_pd(p[1], phi, q[1])),
                ];
            }
            let tstart = t0 + tv * 16;
            // SAFETY: AVX-512F (this function's); channel k belongs to this item.
            unsafe { store_tiles(ctx, k, tstart, (tstart + 16).min(t1), &rows) };
            tv += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_rel, rand_vec};

    /// Runs every case `(b, c, h, w, k)` through [`conv_forward`] with the weights that
    /// `pack(wt, k, c, m)` gives for each `(m, tolerance)`, without and with bias + ReLU, and
    /// returns the largest relative error against the GEMM path (each under its tolerance).
    fn check_against_gemm(
        cases: &[(usize, usize, usize, usize, usize)],
        tiles: &[(usize, f32)],
        pack: impl Fn(&[f32], usize, usize, usize) -> PackedWinograd,
    ) -> f32 {
        let mut worst = 0f32;
        for (i, &(b, c, h, w, k)) in cases.iter().enumerate() {
            let g = ConvGeom::new(b, c, h, w, k, 3, 3, 1, 1).expect("geom");
            let x = rand_vec(g.input_len(), 3 * i as u64);
            let wt = rand_vec(g.weight_len(), 3 * i as u64 + 1);
            let bias = rand_vec(k, 3 * i as u64 + 2);
            for &(m, tol) in tiles {
                let pw = pack(&wt, k, c, m);
                for (bias, relu) in [(None, false), (Some(&bias[..]), true)] {
                    let want =
                        crate::kernels::reference::conv2d_forward_gemm(&g, &x, &wt, bias, relu);
                    let got = conv_forward(&g, &x, &pw, bias, relu);
                    let err = max_rel(&got, &want);
                    assert!(err < tol, "case {i} F({m}x{m}) {g:?}: max rel err {err}");
                    worst = worst.max(err);
                }
            }
        }
        worst
    }

    #[test]
    fn winograd_matches_gemm_path() {
        if crate::kernels::isa::skip_without_avx512("winograd_matches_gemm_path") {
            return;
        }
        // b, c, h, w, k: even and odd sizes, rows of tiles longer and shorter than 16, channel
        // counts that do not fill a panel, several blocks.
        let cases = [
            (1, 64, 48, 48, 64),
            (2, 3, 13, 11, 17),
            (1, 1, 2, 2, 1),
            (3, 16, 7, 40, 33),
            (8, 128, 12, 12, 128),
            (1, 5, 35, 3, 2),
            // Tiny maps over a batch (the 7x7 stem's last stage).
            (8, 32, 2, 2, 40),
            // Blocks of fewer than 16 tiles, not a multiple of 16 (GEMM over output channels):
            // 9 tiles at batch 1 on 12x12 with F(4x4), a panel that K does not fill.
            (1, 40, 12, 12, 20),
        ];
        // Measured: F(2x2) <= 7e-7, F(4x4) <= 1e-5 (its transforms scale values by up to 8).
        check_against_gemm(&cases, &[(2, 5e-6), (4, 5e-5)], PackedWinograd::pack);
    }

    /// The bf16 GEMMs against the f32 reference, on sizes that take the 16-tile GEMM (even
    /// channel counts; rows of tiles longer and shorter than 16, a panel K does not fill):
    /// within the stated bound, and not exact (the bf16 path runs).
    #[test]
    fn winograd_bf16_matches_gemm_path_within_bf16_rounding() {
        if crate::kernels::isa::skip_without_bf16("winograd_bf16_matches_gemm_path") {
            return;
        }
        let cases = [
            (1, 64, 48, 48, 64),
            (2, 2, 13, 11, 17),
            (3, 16, 7, 40, 33),
            (8, 128, 12, 12, 128),
            (64, 256, 6, 6, 256),
        ];
        // bf16 keeps 8 significant bits (relative rounding <= 2^-9 per operand). F(2x2) only,
        // as training runs it (`conv::bf16_pays`); measured max 4.5e-3.
        let pack = |wt: &[f32], k, c, m| PackedWinograd::pack(wt, k, c, m).with_bf16();
        let worst = check_against_gemm(&cases, &[(2, 1e-2)], pack);
        assert!(worst > 1e-5, "bf16: exact, so not bf16 ({worst})");
    }
}
