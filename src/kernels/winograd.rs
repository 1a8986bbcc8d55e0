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

use super::cpu::{ConvGeom, SharedOut};
use super::direct::{self, MR};

/// Transformed weights `U_ξ (K, C)` for the 16 positions ξ, each in panels of [`MR`] channels.
#[derive(Debug, Clone)]
pub struct PackedWinograd {
    pub k: usize,
    pub c: usize,
    /// `[ξ][panel][c][MR]`.
    data: Vec<f32>,
}

impl PackedWinograd {
    /// Transforms and packs `(k, c, 3, 3)` weights.
    pub fn pack(w: &[f32], k: usize, c: usize) -> Self {
        assert_eq!(w.len(), k * c * 9, "winograd pack: weight length");
        let panels = k.div_ceil(MR);
        let mut data = vec![0f32; 16 * panels * c * MR];
        for o in 0..k {
            for ci in 0..c {
                let g = &w[(o * c + ci) * 9..][..9];
                // G g: 4x3, then (G g) Gᵀ: 4x4, with G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1].
                let mut gg = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, cc) = (g[j], g[3 + j], g[6 + j]);
                    gg[0][j] = a;
                    gg[1][j] = 0.5 * (a + b + cc);
                    gg[2][j] = 0.5 * (a - b + cc);
                    gg[3][j] = cc;
                }
                for (i, row) in gg.iter().enumerate() {
                    let u = [
                        row[0],
                        0.5 * (row[0] + row[1] + row[2]),
                        0.5 * (row[0] - row[1] + row[2]),
                        row[2],
                    ];
                    for (j, &v) in u.iter().enumerate() {
                        let xi = i * 4 + j;
                        let idx = ((xi * panels + o / MR) * c + ci) * MR + o % MR;
                        data[idx] = v;
                    }
                }
            }
        }
        Self { k, c, data }
    }

    fn panels(&self) -> usize {
        self.k.div_ceil(MR)
    }

    fn panel(&self, xi: usize, p: usize) -> &[f32] {
        let len = self.c * MR;
        &self.data[(xi * self.panels() + p) * len..][..len]
    }
}

/// Whether F(2x2, 3x3) computes this convolution (3x3, stride 1, padding 1).
pub fn applicable(g: &ConvGeom) -> bool {
    (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1)
}

/// Whether Winograd beats the direct kernel here (measured with `examples/conv_gflops.rs`): with
/// few tiles (over the batch) its fixed costs dominate unless the layer is wide, and with fewer
/// still, streaming its 16/9 larger weights from memory costs more than the multiplications saved.
/// With a handful of input channels (the stem) the transforms cost more than the GEMMs. On tiny
/// maps (2x2, 3x3 over a batch) the direct kernel wastes most of its vector lanes and Winograd
/// wins again.
pub fn worthwhile(g: &ConvGeom) -> bool {
    let tiles = g.b * g.oh.div_ceil(2) * g.ow.div_ceil(2);
    // Share of the direct kernel's 16-wide vectors that land on outputs: its grid is `oh` rows of
    // `ow + 2` (padded) columns per image, so tiny maps waste most lanes (2x2: a quarter).
    let grid = g.oh * (g.ow + 2);
    let direct_lane_use = (g.oh * g.ow) as f64 / (grid.div_ceil(16) * 16) as f64;
    applicable(g)
        && direct::available()
        && g.c >= 8
        && (tiles >= 64 || (tiles >= 32 && g.c >= 128) || (tiles >= 8 && direct_lane_use < 0.5))
}

/// Tile geometry of one convolution.
struct Tiles {
    tw: usize,
    /// Tiles per image.
    per_img: usize,
    total: usize,
    /// Padded input row width and rows (2·tiles + 2).
    wp: usize,
    hp: usize,
}

impl Tiles {
    fn new(g: &ConvGeom) -> Self {
        let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        Self {
            tw,
            per_img: th * tw,
            total: g.b * th * tw,
            wp: 2 * tw + 2,
            hp: 2 * th + 2,
        }
    }

    /// Runs of up to 16 tiles of one tile row, covering tiles `t0..t1`: `(tile, n, ty, tx, len)`.
    fn runs(&self, t0: usize, t1: usize) -> Runs<'_> {
        Runs {
            tl: self,
            t: t0,
            t1,
        }
    }
}

struct Runs<'a> {
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
    let tl = Tiles::new(g);

    // Zero-padded copy of the input, (b, c, hp, wp), with slack for the last vector loads; built
    // by appending, so no float is written twice.
    let mut xp = Vec::with_capacity(g.b * g.c * tl.hp * tl.wp + 64);
    for src in x.chunks(g.h * g.w) {
        xp.resize(xp.len() + tl.wp, 0.0);
        for row in src.chunks(g.w) {
            xp.push(0.0);
            xp.extend_from_slice(row);
            xp.resize(xp.len() + tl.wp - g.w - 1, 0.0);
        }
        xp.resize(xp.len() + (tl.hp - g.h - 1) * tl.wp, 0.0);
    }
    xp.resize(xp.len() + 64, 0.0);
    let xp = &xp[..];

    let mut y = vec![0f32; g.output_len()];
    let out = SharedOut::new(&mut y);
    let mut bias_v = vec![0f32; g.k];
    if let Some(b) = bias {
        bias_v.copy_from_slice(b);
    }

    // Block size: V and M of a block (16·(C+K) floats per tile) within about 1.5 MiB, and at
    // least four blocks per core where that leaves 16 tiles per block.
    let threads = rayon::current_num_threads().max(1);
    let fit = (1536 * 1024 / 4) / (16 * (g.c + g.k));
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
struct Scratch {
    buf: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A buffer of at least `len` initialised floats (of unspecified value).
    fn take(len: usize) -> Self {
        let mut buf = SCRATCH.with(|s| s.borrow_mut().pop().unwrap_or_default());
        if buf.len() < len {
            buf.resize(len, 0.0);
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
fn for_each(n: usize, par: bool, f: impl Fn(usize) + Sync + Send) {
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
        // Lanes past t1 in the last vector hold stale (initialised) values; they only reach M
        // lanes that the output transform never stores.
        let mut v_buf = Scratch::take(16 * g.c * ntp);
        let mut m_buf = Scratch::take(16 * g.k * ntp);
        let v = &mut v_buf.buf[..16 * g.c * ntp];
        let m = &mut m_buf.buf[..16 * g.k * ntp];
        let vs = SharedOut::new(v);
        let ms = SharedOut::new(m);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (vs, ms, par);
        // SAFETY (all three stages): AVX-512F is present (asserted by `conv_forward`); each
        // parallel item writes a disjoint part of its buffer (one input channel of V; one
        // (ξ, panel, vector) block of M; one output channel), every index bounded by asserts.
        #[cfg(target_arch = "x86_64")]
        for_each(g.c, par, |c| unsafe {
            avx512::input_transform(tl, self.xp, g.c, c, t0, t1, ntp, vs)
        });
        let panels = self.pw.panels();
        let vecs = ntp / 16;
        let off: Vec<u32> = (0..g.c).map(|c| (c * ntp) as u32).collect();
        let (v, off) = (&*v, &off);
        #[cfg(target_arch = "x86_64")]
        for_each(16 * panels * vecs, par, |i| {
            let (xi, p, tv) = (i / (panels * vecs), (i / vecs) % panels, i % vecs);
            unsafe { avx512::gemm(self, xi, p, tv, v, off, ntp, ms) }
        });
        let m = &*m;
        #[cfg(target_arch = "x86_64")]
        for_each(g.k, par, |k| unsafe {
            avx512::output_transform(self, m, k, t0, t1, ntp)
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Ctx, SharedOut, Tiles, MR};
    use crate::kernels::direct::avx512::tile;

    const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];
    const INTERLEAVE_LO: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const INTERLEAVE_HI: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

    #[target_feature(enable = "avx512f")]
    fn idx(v: &[i32; 16]) -> __m512i {
        // SAFETY: 16 i32 are 64 bytes.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

    /// `V_ξ[c][t − t0]` for input channel `c` and tiles `t0..t1`.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `c` of `v`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn input_transform(
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
        assert!(16 * channels * ntp <= v.len());
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
                    let dst = ((i * 4 + j) * channels + c) * ntp + (t - t0);
                    // SAFETY: dst + len <= 16·channels·ntp (asserted), lanes past len masked.
                    unsafe { _mm512_mask_storeu_ps(v.ptr().add(dst), mask, val) };
                }
            }
        }
    }

    /// `M_ξ` rows of panel `p`, tile vector `tv`.
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
        let xv = &v[xi * c * ntp..(xi + 1) * c * ntp];
        assert!(a.len() == c * MR && off.len() == c);
        assert!((c - 1) * ntp + tv * 16 + 16 <= xv.len());
        // SAFETY: bounds asserted above.
        let acc = unsafe { tile(c, a.as_ptr(), xv.as_ptr().add(tv * 16), off) };
        let rows = MR.min(k - p * MR);
        assert!((xi * k + p * MR + rows) * ntp <= m.len());
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let dst = (xi * k + p * MR + r) * ntp + tv * 16;
            // SAFETY: asserted in bounds; this block belongs to this item.
            unsafe { _mm512_storeu_ps(m.ptr().add(dst), *acc) };
        }
    }

    /// Output channel `k` of tiles `t0..t1`: `Aᵀ M A`, bias, ReLU, stored into NCHW.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `k` of these tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_transform(
        ctx: &Ctx,
        m: &[f32],
        k: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
    ) {
        let (g, tl) = (ctx.g, ctx.tl);
        let (lo, hi) = (idx(&INTERLEAVE_LO), idx(&INTERLEAVE_HI));
        let bias = _mm512_set1_ps(ctx.bias[k]);
        assert!(16 * g.k * ntp <= m.len());
        assert!(g.b * g.k * g.oh * g.ow <= ctx.out.len());
        let mut tv = 0;
        while tv * 16 < t1 - t0 {
            let mut mm = [[_mm512_setzero_ps(); 4]; 4];
            for (i, row) in mm.iter_mut().enumerate() {
                for (j, val) in row.iter_mut().enumerate() {
                    // SAFETY: (ξ·K + k)·ntp + 16·tv + 16 <= 16·K·ntp.
                    *val = unsafe {
                        _mm512_loadu_ps(m.as_ptr().add(((i * 4 + j) * g.k + k) * ntp + tv * 16))
                    };
                }
            }
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
            for (t, n, ty, tx, len) in tl.runs(tstart, (tstart + 16).min(t1)) {
                let lane = t - tstart;
                // Floats 2·lane .. 2·lane + ncols of the interleaved pair go to columns 2·tx...
                let ncols = (2 * len).min(g.ow - 2 * tx);
                let (f0, f1) = (2 * lane, 2 * lane + ncols);
                for (dy, halves) in rows.iter().enumerate() {
                    let oy = 2 * ty + dy;
                    if oy >= g.oh {
                        continue;
                    }
                    let row = ((n * g.k + k) * g.oh + oy) * g.ow + 2 * tx;
                    for (h, half) in halves.iter().enumerate() {
                        let (a, b) = (f0.max(16 * h), f1.min(16 * (h + 1)));
                        if a >= b {
                            continue;
                        }
                        let mask: __mmask16 =
                            ((((1u32 << (b - a)) - 1) << (a - 16 * h)) & 0xffff) as u16;
                        // Float f of this half goes to row + f − f0; lanes outside a..b masked.
                        let p = ctx.out.ptr().wrapping_add(row + 16 * h).wrapping_sub(f0);
                        // SAFETY: columns 2·tx .. 2·tx + ncols <= ow of row oy, channel k,
                        // image n: inside the output and owned by this item.
                        unsafe { _mm512_mask_storeu_ps(p, mask, *half) };
                    }
                }
            }
            tv += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu;
    use crate::kernels::direct::tests::{max_rel, rand_vec};

    #[test]
    fn winograd_matches_gemm_path() {
        if !direct::available() {
            eprintln!("SKIPPED winograd_matches_gemm_path: no AVX-512F on this CPU");
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
        ];
        for (i, &(b, c, h, w, k)) in cases.iter().enumerate() {
            let g = ConvGeom::new(b, c, h, w, k, 3, 3, 1, 1).expect("geom");
            let x = rand_vec(g.input_len(), 3 * i as u64);
            let wt = rand_vec(g.weight_len(), 3 * i as u64 + 1);
            let bias = rand_vec(k, 3 * i as u64 + 2);
            let pw = PackedWinograd::pack(&wt, k, c);
            for (bias, relu) in [(None, false), (Some(&bias[..]), true)] {
                let want = cpu::conv2d_forward_gemm(&g, &x, &wt, bias, relu);
                let got = conv_forward(&g, &x, &pw, bias, relu);
                let err = max_rel(&got, &want);
                assert!(err < 2e-5, "case {i} {g:?}: max rel err {err}");
            }
        }
    }
}
