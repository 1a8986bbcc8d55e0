//! Winograd F(2x2, 3x3) for 3x3 stride-1 padding-1 convolutions (Lavin & Gray, 2016), on the
//! AVX-512 micro-kernel of [`super::direct`].
//!
//! Each 2x2 output tile comes from a 4x4 input tile `d`: `Y = Aᵀ [ Σ_c (G g Gᵀ) ⊙ (Bᵀ d B) ] A`.
//! The element-wise product summed over input channels is 16 independent GEMMs, one per position
//! ξ of the 4x4 transformed tile: `M_ξ (K, tiles) = U_ξ (K, C) · V_ξ (C, tiles)`. That is 16·C·K
//! multiply-adds per tile instead of 36·C·K, 2.25x fewer.
//!
//! - `U = G g Gᵀ` is computed and packed into [`MR`]-channel panels once per weight tensor.
//! - Tiles of all images are numbered densely (`n`, tile row, tile column) and processed in blocks
//!   sized so that a block's `V` and `M` stay in L2. Per block: the input transform writes `V`
//!   (16 tiles per vector: even/odd de-interleaving of padded input rows), the GEMMs write `M`,
//!   and the output transform adds the bias, applies ReLU and stores the 2x2 tiles (interleaving
//!   back).
//! - Blocks run in parallel when there are enough of them; otherwise each stage of the single
//!   block is split across the cores.
//!
//! The transforms only add and subtract (and halve, for `U`), so the result differs from direct
//! convolution by float rounding only; the parity tests bound it.

use rayon::prelude::*;

use super::direct::{self, MR};
use super::geom::{ConvGeom, SharedOut};

/// `G` of F(2x2, 3x3): the weight transform (4x3).
pub(super) const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// `G` of F(4x4, 3x3) with interpolation points 0, ±1, ±2, ∞ (6x3).
pub(super) const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

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
        Self { k, c, m, data }
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

    /// Panels `p..p + n` of position ξ, one after the other (`c·MR` floats each).
    fn panel_run(&self, xi: usize, p: usize, n: usize) -> &[f32] {
        let len = self.c * MR;
        assert!(p + n <= self.panels());
        &self.data[(xi * self.panels() + p) * len..][..n * len]
    }
}

/// Whether F(2x2, 3x3) computes this convolution (3x3, stride 1, padding 1).
pub fn applicable(g: &ConvGeom) -> bool {
    (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1)
}

/// The Winograd tile size for this convolution, if Winograd beats the direct kernel here
/// (measured with `examples/conv_gflops.rs` and whole-encoder runs): 4 on maps of at least 24x24
/// (12x12 for layers of 64 channels or more), where F(4x4,3x3) needs 2.25 multiplications per
/// output against F(2x2,3x3)'s 4; 2 on smaller maps, where 4x4 tiles waste too much.
///
/// With few tiles (over the batch) the fixed costs dominate unless the layer is wide (from 64
/// channels: the 7x7 stem's 12x12 layer at batch 1 in 9 tiles of F(4x4) made the whole
/// forward 7% faster than the direct kernel, and 4% at batch 8 against F(2x2)), and with
/// fewer still, streaming the larger transformed weights from memory costs more than the
/// multiplications saved. With a handful of input channels (the stem) the transforms cost more
/// than the GEMMs. Tiny maps (6x6 and smaller) below 64 tiles stay with the direct kernel's
/// few-positions form, which fills its vectors from the whole batch (measured at batch 8: 3x3
/// and 2x2 maps 20% faster than F(2x2)), except 6x6 maps of 256 channels or more: there
/// F(2x2)'s 2.25x fewer multiplications win even at batch 1 (3x3 stem at batch 1 7% faster;
/// at 128 channels, no gain).
pub fn tile_size(g: &ConvGeom) -> Option<usize> {
    let tiles = g.b * g.oh.div_ceil(2) * g.ow.div_ceil(2);
    let wins = applicable(g)
        && direct::available()
        && g.c >= 8
        && (tiles >= 64
            || (tiles >= 32 && g.c >= 64 && !direct::few_positions(g))
            || (g.oh.min(g.ow) >= 6 && g.c >= 256));
    match wins {
        false => None,
        true if g.oh.min(g.ow) >= if g.c >= 64 { 12 } else { 24 } => Some(4),
        true => Some(2),
    }
}

/// Floats from one ξ block `[channels][ntp]` of a transformed chunk (V, M, U) to the next: the
/// block plus one cache line. The blocks are multiples of 4 KiB, so without it the 16 or 36
/// rows of one channel, which a transform writes or reads together, would all fall into the
/// same L1 set.
pub(super) fn xi_stride(channels: usize, ntp: usize) -> usize {
    channels * ntp + 16
}

/// Tile geometry of one convolution.
pub(super) struct Tiles {
    /// Output tile size.
    m: usize,
    tw: usize,
    /// Tiles per image.
    per_img: usize,
    pub(super) total: usize,
    /// Padded input row width and rows (m·tiles + 2).
    pub(super) wp: usize,
    pub(super) hp: usize,
}

impl Tiles {
    pub(super) fn new(g: &ConvGeom, m: usize) -> Self {
        let (th, tw) = (g.oh.div_ceil(m), g.ow.div_ceil(m));
        Self {
            m,
            tw,
            per_img: th * tw,
            total: g.b * th * tw,
            wp: m * tw + 2,
            hp: m * th + 2,
        }
    }

    /// Runs of up to 16 tiles of one tile row, covering tiles `t0..t1`: `(tile, n, ty, tx, len)`.
    pub(super) fn runs(&self, t0: usize, t1: usize) -> Runs<'_> {
        Runs {
            tl: self,
            t: t0,
            t1,
        }
    }
}

pub(super) struct Runs<'a> {
    tl: &'a Tiles,
    t: usize,
    t1: usize,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize, usize, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        if self.t >= self.t1 {
            return None;
        }
        let (tl, t) = (self.tl, self.t);
        let (n, r) = (t / tl.per_img, t % tl.per_img);
        let (ty, tx) = (r / tl.tw, r % tl.tw);
        let len = (tl.tw - tx).min(16).min(self.t1 - t);
        self.t += len;
        Some((t, n, ty, tx, len))
    }
}

/// Floats past the padded input that the last tile row's vector loads may read.
const SLACK: usize = 96;

/// Planes of `h x w` (`src` holds a whole number of them) copied into zero-padded planes of
/// `hp x wp` at row and column offset `pad`, followed by [`SLACK`] zeros for the last vector
/// loads. Plane by plane across the cores, each float written once.
pub(super) fn padded_planes(
    src: &[f32],
    (h, w): (usize, usize),
    (hp, wp): (usize, usize),
    pad: usize,
) -> Vec<f32> {
    assert!(h + pad <= hp && w + pad <= wp && src.len().is_multiple_of(h * w));
    let total = src.len() / (h * w) * hp * wp;
    let mut out = Vec::with_capacity(total + SLACK);
    let (body, slack) = out.spare_capacity_mut()[..total + SLACK].split_at_mut(total);
    let zero = std::mem::MaybeUninit::new(0.0);
    body.par_chunks_mut(hp * wp)
        .zip(src.par_chunks(h * w))
        .with_min_len(8)
        .for_each(|(dst, plane)| {
            for (i, drow) in dst.chunks_mut(wp).enumerate() {
                match i.checked_sub(pad).filter(|&y| y < h) {
                    Some(y) => {
                        let (left, rest) = drow.split_at_mut(pad);
                        let (mid, right) = rest.split_at_mut(w);
                        left.fill(zero);
                        for (d, &v) in mid.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                            d.write(v);
                        }
                        right.fill(zero);
                    }
                    None => drow.fill(zero),
                }
            }
        });
    slack.fill(zero);
    // SAFETY: every one of the first total + SLACK floats was written above.
    unsafe { out.set_len(total + SLACK) };
    out
}

/// `relu?(conv3x3(x, w) + bias)` with stride 1 and padding 1, `x (b, c, h, w)` → `(b, k, h, w)`.
///
/// Panics unless [`applicable`], AVX-512 is present and the sizes agree.
pub fn conv_forward(
    g: &ConvGeom,
    x: &[f32],
    pw: &PackedWinograd,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    assert!(applicable(g) && direct::available());
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

/// A per-thread buffer that is reused across calls instead of being allocated and cleared each
/// time (the block buffers are bounded by the block size). Popped from the thread's pool while in
/// use, so a nested call (a rayon worker that runs another convolution while it waits) gets a
/// different one.
pub(super) struct Scratch {
    pub(super) buf: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A buffer of at least `len` initialised floats (of unspecified value).
    ///
    /// Takes the smallest pooled buffer that is large enough, else the largest, which is then
    /// replaced by a fresh one of `len` floats (not grown: growing copies the old contents).
    pub(super) fn take(len: usize) -> Self {
        let buf = SCRATCH.with(|s| {
            let mut pool = s.borrow_mut();
            let fits = (0..pool.len())
                .filter(|&i| pool[i].len() >= len)
                .min_by_key(|&i| pool[i].len());
            let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        });
        if buf.len() < len {
            return Self {
                buf: vec![0.0; len],
            };
        }
        Self { buf }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        SCRATCH.with(|s| s.borrow_mut().push(buf));
    }
}

/// `f(i)` for `i < n`, split across the cores when `par`.
pub(super) fn for_each(n: usize, par: bool, f: impl Fn(usize) + Sync + Send) {
    if par && n > 1 {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
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
            let parts = n.div_ceil(direct::FEW_POS);
            let pairs = panels.div_ceil(2);
            let v = &*v;
            #[cfg(target_arch = "x86_64")]
            for_each(xis * pairs * parts, par, |i| {
                let (xi, pair, part) = (i / (pairs * parts), (i / parts) % pairs, i % parts);
                let (a, b) = (
                    part * direct::FEW_POS,
                    ((part + 1) * direct::FEW_POS).min(n),
                );
                let (p, np) = direct::panel_pair(panels, pair);
                unsafe { avx512::gemm_few(self, xi, (p, np), (a, b), v, ntp, ms) }
            });
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
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::{xi_stride, Ctx, SharedOut, Tiles, MR};
    use crate::kernels::direct::avx512::{few_tile_any, few_width, tile};
    use crate::kernels::direct::FewGeo;
    use crate::kernels::direct::ALL_SLOTS;
    use crate::kernels::direct::FEW_POS;

    pub(in crate::kernels) const EVEN: [i32; 16] =
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    pub(in crate::kernels) const ODD: [i32; 16] =
        [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];
    const INTERLEAVE_LO: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const INTERLEAVE_HI: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

    #[target_feature(enable = "avx512f")]
    pub(in crate::kernels) fn idx(v: &[i32; 16]) -> __m512i {
        // SAFETY: 16 i32 are 64 bytes.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

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

    /// `V_ξ[c][t − t0]` for input channel `c` and tiles `t0..t1`.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `c` of `v`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) unsafe fn input2(
        tl: &Tiles,
        xp: &[f32],
        channels: usize,
        c: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
        v: SharedOut,
    ) {
        let (even, odd) = (idx(&EVEN), idx(&ODD));
        let plane = tl.hp * tl.wp;
        assert!(16 * xi_stride(channels, ntp) <= v.len());
        for (t, n, ty, tx, len) in tl.runs(t0, t1) {
            let base = (n * channels + c) * plane + 2 * ty * tl.wp + 2 * tx;
            // The farthest read: 3 rows down, 2 + 32 floats across (slack covers the overrun).
            assert!(base + 3 * tl.wp + 34 <= xp.len());
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for (i, row) in d.iter_mut().enumerate() {
                // SAFETY: asserted above.
                let (a, b, a2, b2) = unsafe {
                    let r = xp.as_ptr().add(base + i * tl.wp);
                    (
                        _mm512_loadu_ps(r),
                        _mm512_loadu_ps(r.add(16)),
                        _mm512_loadu_ps(r.add(2)),
                        _mm512_loadu_ps(r.add(18)),
                    )
                };
                row[0] = _mm512_permutex2var_ps(a, even, b);
                row[1] = _mm512_permutex2var_ps(a, odd, b);
                row[2] = _mm512_permutex2var_ps(a2, even, b2);
                row[3] = _mm512_permutex2var_ps(a2, odd, b2);
            }
            // Bᵀ d B with Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
            let mut tmp = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..4 {
                tmp[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                tmp[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                tmp[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                tmp[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
            }
            let mask: __mmask16 = ((1u32 << len) - 1) as u16;
            for (i, r) in tmp.iter().enumerate() {
                let vals = [
                    _mm512_sub_ps(r[0], r[2]),
                    _mm512_add_ps(r[1], r[2]),
                    _mm512_sub_ps(r[2], r[1]),
                    _mm512_sub_ps(r[1], r[3]),
                ];
                for (j, val) in vals.into_iter().enumerate() {
                    let dst = (i * 4 + j) * xi_stride(channels, ntp) + c * ntp + (t - t0);
                    // SAFETY: dst + len <= 16·xi_stride(channels, ntp) (asserted), lanes
                    // past len masked.
                    unsafe { _mm512_mask_storeu_ps(v.ptr().add(dst), mask, val) };
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
        let (c, k) = (ctx.g.c, ctx.g.k);
        let a = ctx.pw.panel(xi, p);
        let xv = &v[xi * xi_stride(c, ntp)..][..c * ntp];
        assert!(a.len() == c * MR && off.len() == c);
        assert!((c - 1) * ntp + tv * 16 + 16 <= xv.len());
        // SAFETY: bounds asserted above.
        let acc = unsafe { tile::<true>(c, a.as_ptr(), xv.as_ptr().add(tv * 16), off) };
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

    /// `[j, 4+j, …, 28+j]` twice: lanes 0-7 pick from the first pair of vectors, 8-15 from the
    /// second, giving floats `4t + j` of 64 consecutive ones.
    const fn stride4(j: i32) -> [i32; 16] {
        let mut v = [0; 16];
        let mut t = 0;
        while t < 16 {
            v[t] = 4 * (t as i32 % 8) + j;
            t += 1;
        }
        v
    }
    pub(in crate::kernels) const STRIDE4: [[i32; 16]; 4] =
        [stride4(0), stride4(1), stride4(2), stride4(3)];
    /// Interleave 64-bit pairs: `[a0 b0 a1 b1 a2 b2 a3 b3]` and the upper half.
    const PAIRS_LO: [i64; 8] = [0, 8, 1, 9, 2, 10, 3, 11];
    const PAIRS_HI: [i64; 8] = [4, 12, 5, 13, 6, 14, 7, 15];

    #[target_feature(enable = "avx512f")]
    fn idx64(v: &[i64; 8]) -> __m512i {
        // SAFETY: 8 i64 are 64 bytes.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

    /// `Bᵀ d B` along one axis for F(4x4,3x3):
    /// `Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn bt6(d: [__m512; 6]) -> [__m512; 6] {
        let (four, five, two) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(5.0),
            _mm512_set1_ps(2.0),
        );
        // t0 = 4d0 − 5d2 + d4
        let t0 = _mm512_fnmadd_ps(five, d[2], _mm512_fmadd_ps(four, d[0], d[4]));
        // t1 = −4(d1 + d2) + d3 + d4 ; t2 = 4(d1 − d2) − d3 + d4
        let t1 = _mm512_fnmadd_ps(four, _mm512_add_ps(d[1], d[2]), _mm512_add_ps(d[3], d[4]));
        let t2 = _mm512_fmadd_ps(four, _mm512_sub_ps(d[1], d[2]), _mm512_sub_ps(d[4], d[3]));
        // t3 = 2(d3 − d1) + d4 − d2 ; t4 = 2(d1 − d3) + d4 − d2
        let t3 = _mm512_fmadd_ps(two, _mm512_sub_ps(d[3], d[1]), _mm512_sub_ps(d[4], d[2]));
        let t4 = _mm512_fmadd_ps(two, _mm512_sub_ps(d[1], d[3]), _mm512_sub_ps(d[4], d[2]));
        // t5 = 4d1 − 5d3 + d5
        let t5 = _mm512_fnmadd_ps(five, d[3], _mm512_fmadd_ps(four, d[1], d[5]));
        [t0, t1, t2, t3, t4, t5]
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

    /// [`input2`] for F(4x4,3x3): 6x6 input tiles at stride 4, 36 positions ξ.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `c` of `v`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) unsafe fn input4(
        tl: &Tiles,
        xp: &[f32],
        channels: usize,
        c: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
        v: SharedOut,
    ) {
        let sel = [
            idx(&STRIDE4[0]),
            idx(&STRIDE4[1]),
            idx(&STRIDE4[2]),
            idx(&STRIDE4[3]),
        ];
        let plane = tl.hp * tl.wp;
        assert!(36 * xi_stride(channels, ntp) <= v.len());
        for (t, n, ty, tx, len) in tl.runs(t0, t1) {
            let base = (n * channels + c) * plane + 4 * ty * tl.wp + 4 * tx;
            // The farthest read: 5 rows down, 4 + 64 floats across (slack covers the overrun).
            assert!(base + 5 * tl.wp + 68 <= xp.len());
            let mut d = [[_mm512_setzero_ps(); 6]; 6];
            for (i, row) in d.iter_mut().enumerate() {
                // SAFETY: asserted above.
                let r = unsafe { xp.as_ptr().add(base + i * tl.wp) };
                // SAFETY: asserted above (r + 64 floats, and r[64], r[65], are in bounds).
                let (q, next) = unsafe {
                    (
                        [
                            _mm512_loadu_ps(r),
                            _mm512_loadu_ps(r.add(16)),
                            _mm512_loadu_ps(r.add(32)),
                            _mm512_loadu_ps(r.add(48)),
                        ],
                        [*r.add(64), *r.add(65)],
                    )
                };
                for (j, s) in sel.iter().enumerate() {
                    let lo = _mm512_permutex2var_ps(q[0], *s, q[1]);
                    let hi = _mm512_permutex2var_ps(q[2], *s, q[3]);
                    row[j] = _mm512_mask_blend_ps(0xff00, lo, hi);
                }
                // Columns 4 and 5 of tile t are columns 0 and 1 of tile t + 1: shift those down
                // one lane and take tile 16's from the row (floats 64 and 65).
                for j in 0..2 {
                    let shifted = _mm512_alignr_epi32::<1>(
                        _mm512_castps_si512(_mm512_set1_ps(next[j])),
                        _mm512_castps_si512(row[j]),
                    );
                    row[4 + j] = _mm512_castsi512_ps(shifted);
                }
            }
            // Bᵀ d B: columns of each row, then rows of the result.
            let mut rows = [[_mm512_setzero_ps(); 6]; 6];
            for (r, di) in rows.iter_mut().zip(d) {
                *r = bt6(di);
            }
            let mask: __mmask16 = ((1u32 << len) - 1) as u16;
            // Column j of the row-transformed tile, transformed again.
            #[allow(clippy::needless_range_loop)]
            for j in 0..6 {
                let col = bt6([
                    rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j],
                ]);
                for (i, val) in col.into_iter().enumerate() {
                    let dst = (i * 6 + j) * xi_stride(channels, ntp) + c * ntp + (t - t0);
                    // SAFETY: dst + len <= 36·xi_stride(channels, ntp) (asserted), lanes
                    // past len masked.
                    unsafe { _mm512_mask_storeu_ps(v.ptr().add(dst), mask, val) };
                }
            }
        }
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
    use crate::kernels::direct::tests::{max_rel, rand_vec};

    #[test]
    fn winograd_matches_gemm_path() {
        if direct::skip_without_avx512("winograd_matches_gemm_path") {
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
        for (i, &(b, c, h, w, k)) in cases.iter().enumerate() {
            let g = ConvGeom::new(b, c, h, w, k, 3, 3, 1, 1).expect("geom");
            let x = rand_vec(g.input_len(), 3 * i as u64);
            let wt = rand_vec(g.weight_len(), 3 * i as u64 + 1);
            let bias = rand_vec(k, 3 * i as u64 + 2);
            // Measured: F(2x2) <= 7e-7, F(4x4) <= 1e-5 (its transforms scale values by up to 8).
            for (m, tol) in [(2, 5e-6), (4, 5e-5)] {
                let pw = PackedWinograd::pack(&wt, k, c, m);
                for (bias, relu) in [(None, false), (Some(&bias[..]), true)] {
                    let want =
                        crate::kernels::reference::conv2d_forward_gemm(&g, &x, &wt, bias, relu);
                    let got = conv_forward(&g, &x, &pw, bias, relu);
                    let err = max_rel(&got, &want);
                    assert!(err < tol, "case {i} F({m}x{m}) {g:?}: max rel err {err}");
                }
            }
        }
    }
}
