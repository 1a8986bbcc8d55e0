//! CPU reference kernels for 2-D convolution (forward, input gradient, weight gradient) and
//! max-pooling with its backward, on contiguous NCHW `f32` slices.
//!
//! Convolution is lowered to GEMM over im2col tiles: for one image, output `(K, OH·OW)` =
//! `W (K, C·KH·KW) × col (C·KH·KW, OH·OW)`. The column matrix is built a tile of output positions
//! at a time so it stays in L2 at 48x48, and NCHW weights are already the row-major left operand,
//! so no operand is transposed or copied per call: the gemm crate takes arbitrary strides. The
//! gradients are GEMMs too: `dcol = Wᵀ·dY` followed by a scatter-add (col2im), and
//! `dW = Σ dY·colᵀ`. 1x1 stride-1 convolutions skip im2col entirely.
//!
//! The gemm crate picks its kernel (AVX2/FMA, AVX-512 with the `x86-v4` feature) at run time, so
//! one binary runs on any x86-64.

use rayon::prelude::*;

use std::sync::OnceLock;

use super::{cbam_train, direct, lane_sums, wgrad, winograd, MapGeom, WeightFormat};

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// Checks the sizes and derives the output size; `None` if the kernel does not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw || kh == 0 || kw == 0 {
            return None;
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Some(Self {
            b,
            c,
            h,
            w,
            k,
            kh,
            kw,
            stride,
            pad,
            oh,
            ow,
        })
    }

    /// Rows of the column matrix (C·KH·KW).
    pub fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image.
    pub fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output columns per im2col tile: about 128K floats of column matrix (512 KiB), which keeps
    /// the tile and the packed GEMM operands in L2, rounded to a multiple of 64 (the column count
    /// of gemm's widest AVX-512 micro-kernel, since it computes the transposed product).
    fn tile(&self) -> usize {
        let t = (128 * 1024 / self.ckk().max(1)).max(64) / 64 * 64;
        if t >= self.ohw() {
            self.ohw().max(1)
        } else {
            t
        }
    }

    pub fn input_len(&self) -> usize {
        self.b * self.c * self.h * self.w
    }

    pub fn weight_len(&self) -> usize {
        self.k * self.ckk()
    }

    pub fn output_len(&self) -> usize {
        self.b * self.k * self.ohw()
    }
}

/// `C (m×n) = [C +] A (m×k) · B (k×n)` with explicit row/column strides. Sizes are asserted so that
/// every element the strides reach is inside its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, a_rs, k, a_cs) < a.len(), "gemm: A out of bounds");
    assert!(last(k, b_rs, n, b_cs) < b.len(), "gemm: B out of bounds");
    assert!(last(m, c_rs, n, 1) < c.len(), "gemm: C out of bounds");
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides can reach; the slices do not
    // overlap (c is &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Range of output columns `ox` whose input column `ox·s + kx − pad` lies inside `0..w`.
fn valid_ox(g: &ConvGeom, kx: usize) -> (usize, usize) {
    let s = g.stride;
    // ox·s ≥ pad − kx  and  ox·s + kx − pad ≤ w − 1
    let lo = g.pad.saturating_sub(kx).div_ceil(s);
    let hi = if g.w + g.pad > kx {
        ((g.w + g.pad - kx - 1) / s + 1).min(g.ow)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Column tile `(ckk, np)` for output positions `p0..p0+np` of one image `(c, h, w)`.
fn im2col_tile(g: &ConvGeom, x: &[f32], p0: usize, np: usize, col: &mut [f32]) {
    let s = g.stride;
    let mut row = 0;
    for ci in 0..g.c {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let (lo, hi) = valid_ox(g, kx);
                let dst = &mut col[row * np..(row + 1) * np];
                let mut j = 0;
                while j < np {
                    let p = p0 + j;
                    let (oy, ox0) = (p / g.ow, p % g.ow);
                    let run = (g.ow - ox0).min(np - j);
                    let seg = &mut dst[j..j + run];
                    let iy = (oy * s + ky).wrapping_sub(g.pad);
                    let (a, b) = (lo.clamp(ox0, ox0 + run), hi.clamp(ox0, ox0 + run));
                    if iy >= g.h || a >= b {
                        seg.fill(0.0);
                    } else {
                        let src = &plane[iy * g.w..(iy + 1) * g.w];
                        seg[..a - ox0].fill(0.0);
                        seg[b - ox0..].fill(0.0);
                        let first = a * s + kx - g.pad;
                        let out = &mut seg[a - ox0..b - ox0];
                        if s == 1 {
                            out.copy_from_slice(&src[first..first + out.len()]);
                        } else {
                            for (t, v) in out.iter_mut().enumerate() {
                                *v = src[first + t * s];
                            }
                        }
                    }
                    j += run;
                }
                row += 1;
            }
        }
    }
}

/// Scatter-adds a column tile back into the image gradient `(c, h, w)` (inverse of im2col).
fn col2im_tile(g: &ConvGeom, col: &[f32], p0: usize, np: usize, dx: &mut [f32]) {
    let (h, w, s, pad) = (g.h as isize, g.w as isize, g.stride, g.pad as isize);
    let mut row = 0;
    for ci in 0..g.c {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let src = &col[row * np..(row + 1) * np];
                let mut j = 0;
                while j < np {
                    let p = p0 + j;
                    let (oy, ox0) = (p / g.ow, p % g.ow);
                    let run = (g.ow - ox0).min(np - j);
                    let iy = (oy * s) as isize + ky as isize - pad;
                    if iy >= 0 && iy < h {
                        let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        for (t, v) in src[j..j + run].iter().enumerate() {
                            let ix = ((ox0 + t) * s) as isize + kx as isize - pad;
                            if ix >= 0 && ix < w {
                                dst[ix as usize] += v;
                            }
                        }
                    }
                    j += run;
                }
                row += 1;
            }
        }
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// The output buffer, shared by parallel workers that each write a disjoint block of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: workers only write disjoint (row-range × column-range) blocks of one image each, as
// laid out by `conv2d_forward`; the buffer outlives the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }
    // Accessors make closures capture the whole (Sync) struct, not its raw-pointer field.
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.ptr
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Weights packed for the AVX-512 kernels, each layout built on first use and kept (for
/// inference, where the weights do not change between calls).
#[derive(Debug, Default)]
pub struct PackedCache {
    format: WeightFormat,
    direct: OnceLock<direct::PackedWeights>,
    /// [`WeightFormat::F16`]: the few-positions kernel's half-precision panels (`None`
    /// where the weights do not fit half's range).
    direct_half: OnceLock<Option<direct::PackedWeights>>,
    /// F(2x2,3x3) and F(4x4,3x3) weights (which one runs depends on the input size).
    winograd: [OnceLock<winograd::PackedWinograd>; 2],
}

impl PackedCache {
    /// An empty cache whose packs use `format`.
    pub fn new(format: WeightFormat) -> Self {
        Self {
            format,
            ..Self::default()
        }
    }
}

/// Forward convolution `x (b,c,h,w) * w (k,c,kh,kw) [+ bias] [ReLU]` → `(b,k,oh,ow)`.
///
/// Picks the kernel: Winograd (F(4x4,3x3) or F(2x2,3x3), [`winograd::tile_size`]) for 3x3
/// stride-1 layers large enough to gain, the direct
/// AVX-512 kernel for the rest, and im2col + GEMM where the CPU lacks AVX-512. Weights are
/// packed for this call unless `cache` holds them.
pub fn conv2d_forward(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    cache: Option<&PackedCache>,
) -> Vec<f32> {
    assert_eq!(wt.len(), g.weight_len());
    if let Some(m) = winograd::tile_size(g) {
        let pack = || winograd::PackedWinograd::pack(wt, g.k, g.c, m);
        match cache {
            Some(c) => {
                let slot = &c.winograd[usize::from(m == 4)];
                winograd::conv_forward(g, x, slot.get_or_init(pack), bias, relu)
            }
            None => winograd::conv_forward(g, x, &pack(), bias, relu),
        }
    } else if direct::available() {
        let pack = || direct::PackedWeights::pack(wt, g.k, g.c, g.kh, g.kw);
        match cache {
            Some(c) => {
                let half = (c.format == WeightFormat::F16 && direct::half_weights_pay(g))
                    .then(|| {
                        let pack = || direct::PackedWeights::pack_half(wt, g.k, g.c, g.kh, g.kw);
                        c.direct_half.get_or_init(pack).as_ref()
                    })
                    .flatten();
                let pw = half.unwrap_or_else(|| c.direct.get_or_init(pack));
                direct::conv_forward(g, x, pw, bias, relu)
            }
            None => direct::conv_forward(g, x, &pack(), bias, relu),
        }
    } else {
        conv2d_forward_gemm(g, x, wt, bias, relu)
    }
}

/// Forward convolution through im2col + GEMM (the portable path).
///
/// Work is split into (image, column tile, block of output channels) items, enough of them to
/// keep every core busy even at batch 1; each item runs a single-threaded GEMM on its own im2col
/// tile. That costs one fork-join per convolution instead of one per GEMM call.
pub fn conv2d_forward_gemm(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), g.input_len());
    assert_eq!(wt.len(), g.weight_len());
    assert!(bias.is_none_or(|b| b.len() == g.k));
    let mut y = vec![0f32; g.output_len()];
    let (ckk, ohw) = (g.ckk(), g.ohw());
    let in_img = g.c * g.h * g.w;
    let tile = g.tile();
    let tiles = ohw.div_ceil(tile);
    let threads = threads();
    // Split output channels only when images × tiles cannot fill the cores.
    let mblocks = if g.b * tiles >= threads {
        1
    } else {
        threads.div_ceil(g.b * tiles).min(g.k.div_ceil(16)).max(1)
    };
    let mper = g.k.div_ceil(mblocks);
    let out = SharedOut::new(&mut y);
    let pointwise = g.is_pointwise();
    let items = g.b * tiles * mblocks;
    let run = |col: &mut Vec<f32>, item: usize| {
        let img = item / (tiles * mblocks);
        let t = (item / mblocks) % tiles;
        let mb = item % mblocks;
        let (k0, k1) = (mb * mper, ((mb + 1) * mper).min(g.k));
        if k0 >= k1 {
            return;
        }
        let p0 = t * tile;
        let np = tile.min(ohw - p0);
        let xi = &x[img * in_img..(img + 1) * in_img];
        let (rhs, rhs_rs): (&[f32], usize) = if pointwise {
            (&xi[p0..], ohw)
        } else {
            im2col_tile(g, xi, p0, np, &mut col[..ckk * np]);
            (&col[..ckk * np], np)
        };
        assert!(
            (ckk - 1) * rhs_rs + np - 1 < rhs.len(),
            "conv rhs out of bounds"
        );
        let dst_off = (img * g.k + k0) * ohw + p0;
        let last = dst_off + (k1 - k0 - 1) * ohw + np - 1;
        assert!(last < out.len(), "conv output block out of bounds");
        // SAFETY: rows k0..k1 × columns p0..p0+np of image `img` belong to this item alone; the
        // asserts bound every operand inside its buffer.
        unsafe {
            gemm::gemm(
                k1 - k0,
                np,
                ckk,
                out.ptr().add(dst_off),
                1,
                ohw as isize,
                false,
                wt[k0 * ckk..].as_ptr(),
                1,
                ckk as isize,
                rhs.as_ptr(),
                1,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            if bias.is_some() || relu {
                for ki in k0..k1 {
                    let b = bias.map_or(0.0, |b| b[ki]);
                    let row = std::slice::from_raw_parts_mut(
                        out.ptr().add((img * g.k + ki) * ohw + p0),
                        np,
                    );
                    if relu {
                        row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                    } else {
                        row.iter_mut().for_each(|v| *v += b);
                    }
                }
            }
        }
    };
    let col_len = if pointwise { 0 } else { ckk * tile };
    if items == 1 {
        run(&mut vec![0f32; col_len], 0);
    } else {
        (0..items)
            .into_par_iter()
            .for_each_init(|| vec![0f32; col_len], run);
    }
    y
}

/// Input gradient of one image: `dx (c,h,w)` from `dy (k, ohw)`.
fn conv_bwd_input_image(g: &ConvGeom, dy: &[f32], wt: &[f32], dx: &mut [f32], gemm_threads: usize) {
    let (ckk, ohw) = (g.ckk(), g.ohw());
    if g.is_pointwise() {
        // dx (c, hw) = Wᵀ (c, k) · dy (k, hw)
        sgemm(
            g.c,
            ohw,
            g.k,
            wt,
            1,
            ckk,
            dy,
            ohw,
            1,
            dx,
            ohw,
            false,
            gemm_threads,
        );
        return;
    }
    let tile = g.tile();
    let mut dcol = vec![0f32; ckk * tile];
    let mut p0 = 0;
    while p0 < ohw {
        let np = tile.min(ohw - p0);
        sgemm(
            ckk,
            np,
            g.k,
            wt,
            1,
            ckk,
            &dy[p0..],
            ohw,
            1,
            &mut dcol[..ckk * np],
            np,
            false,
            gemm_threads,
        );
        col2im_tile(g, &dcol[..ckk * np], p0, np, dx);
        p0 += np;
    }
}

/// Gradient w.r.t. the input: `(b,c,h,w)` from `dy (b,k,oh,ow)`.
///
/// For stride 1 on a CPU with AVX-512 this is the direct forward kernel run on `dy` with the
/// transposed, flipped weights (padding `kh − 1 − pad`); otherwise GEMM + col2im.
pub fn conv2d_backward_input(g: &ConvGeom, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    if direct::available() && g.stride == 1 && g.pad < g.kh && g.kh == g.kw {
        if let Some(gt) = ConvGeom::new(g.b, g.k, g.oh, g.ow, g.c, g.kh, g.kw, 1, g.kh - 1 - g.pad)
        {
            if (gt.oh, gt.ow) == (g.h, g.w) {
                assert_eq!(dy.len(), g.output_len());
                let wt_flipped = transpose_flip(g, wt);
                return conv2d_forward(&gt, dy, &wt_flipped, None, false, None);
            }
        }
    }
    conv2d_backward_input_gemm(g, dy, wt)
}

/// `w'(c, k, y, x) = w(k, c, kh−1−y, kw−1−x)`: the weights of the input gradient of a stride-1
/// convolution, itself a `k → c` convolution.
fn transpose_flip(g: &ConvGeom, wt: &[f32]) -> Vec<f32> {
    let (kh, kw) = (g.kh, g.kw);
    let mut out = vec![0f32; wt.len()];
    for k in 0..g.k {
        for c in 0..g.c {
            for y in 0..kh {
                for x in 0..kw {
                    out[((c * g.k + k) * kh + y) * kw + x] =
                        wt[((k * g.c + c) * kh + (kh - 1 - y)) * kw + (kw - 1 - x)];
                }
            }
        }
    }
    out
}

/// Gradient w.r.t. the input through GEMM + col2im (the portable path).
pub fn conv2d_backward_input_gemm(g: &ConvGeom, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    assert_eq!(dy.len(), g.output_len());
    assert_eq!(wt.len(), g.weight_len());
    let mut dx = vec![0f32; g.input_len()];
    let (in_img, out_img) = (g.c * g.h * g.w, g.k * g.ohw());
    if g.b == 1 {
        conv_bwd_input_image(g, dy, wt, &mut dx, threads());
    } else {
        dx.par_chunks_mut(in_img)
            .zip(dy.par_chunks(out_img))
            .for_each(|(dxi, dyi)| conv_bwd_input_image(g, dyi, wt, dxi, 1));
    }
    dx
}

/// Accumulates `dw (k, ckk) += dy (k, ohw) · colᵀ` over the given images.
fn conv_bwd_weight_images(
    g: &ConvGeom,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    gemm_threads: usize,
) {
    let (ckk, ohw) = (g.ckk(), g.ohw());
    let (in_img, out_img) = (g.c * g.h * g.w, g.k * ohw);
    let tile = g.tile();
    let mut col = vec![0f32; if g.is_pointwise() { 0 } else { ckk * tile }];
    for (xi, dyi) in x.chunks_exact(in_img).zip(dy.chunks_exact(out_img)) {
        if g.is_pointwise() {
            // dw (k, c) += dy (k, hw) · xᵀ (hw, c)
            sgemm(
                g.k,
                ckk,
                ohw,
                dyi,
                ohw,
                1,
                xi,
                1,
                ohw,
                dw,
                ckk,
                true,
                gemm_threads,
            );
            continue;
        }
        let mut p0 = 0;
        while p0 < ohw {
            let np = tile.min(ohw - p0);
            im2col_tile(g, xi, p0, np, &mut col[..ckk * np]);
            sgemm(
                g.k,
                ckk,
                np,
                &dyi[p0..],
                ohw,
                1,
                &col[..ckk * np],
                1,
                np,
                dw,
                ckk,
                true,
                gemm_threads,
            );
            p0 += np;
        }
    }
}

/// Gradient w.r.t. the weight: `(k,c,kh,kw)` from `x` and `dy`.
///
/// 3x3 stride-1 layers on a CPU with AVX-512 go through Winograd F(3x3,2x2) or F(3x3,4x4)
/// ([`super::wgrad`]); the rest through im2col + GEMM.
pub fn conv2d_backward_weight(g: &ConvGeom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    if wgrad::applicable(g) {
        return wgrad::conv_backward_weight(g, x, dy);
    }
    conv2d_backward_weight_gemm(g, x, dy)
}

/// Gradient w.r.t. the weight through im2col + GEMM (the portable path).
pub fn conv2d_backward_weight_gemm(g: &ConvGeom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), g.input_len());
    assert_eq!(dy.len(), g.output_len());
    let (in_img, out_img) = (g.c * g.h * g.w, g.k * g.ohw());
    let parts = threads().min(g.b).max(1);
    if parts == 1 {
        let mut dw = vec![0f32; g.weight_len()];
        conv_bwd_weight_images(g, x, dy, &mut dw, threads());
        return dw;
    }
    // Each worker sums its share of the batch into its own buffer; then the buffers are added.
    let per = g.b.div_ceil(parts);
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (lo, hi) = (p * per, ((p + 1) * per).min(g.b));
            let mut dw = vec![0f32; g.weight_len()];
            if lo < hi {
                conv_bwd_weight_images(
                    g,
                    &x[lo * in_img..hi * in_img],
                    &dy[lo * out_img..hi * out_img],
                    &mut dw,
                    1,
                );
            }
            dw
        })
        .collect();
    let mut iter = partials.into_iter();
    let mut dw = iter.next().unwrap_or_else(|| vec![0f32; g.weight_len()]);
    for p in iter {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    dw
}

/// Geometry of a max-pool over `(b·c)` planes of `h×w`; padding counts as −∞.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeom {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn new(
        planes: usize,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if kernel == 0
            || stride == 0
            || pad >= kernel
            || h + 2 * pad < kernel
            || w + 2 * pad < kernel
        {
            return None;
        }
        Some(Self {
            planes,
            h,
            w,
            kernel,
            stride,
            pad,
            oh: (h + 2 * pad - kernel) / stride + 1,
            ow: (w + 2 * pad - kernel) / stride + 1,
        })
    }

    /// Input rows (or columns) `0..len` that the window of output row (column) `o` covers.
    /// Never empty: the padding is smaller than the kernel, and the last window starts inside.
    fn window(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride).saturating_sub(self.pad);
        start..(o * self.stride + self.kernel - self.pad).min(len)
    }

    /// Index (within the plane) of the first maximum of the window of output `(oy, ox)`; the
    /// first NaN wins, so that it propagates.
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        let (ys, xs) = (self.window(oy, self.h), self.window(ox, self.w));
        let mut best = ys.start * self.w + xs.start;
        let mut best_v = plane[best];
        for iy in ys {
            let row = iy * self.w;
            for (ix, &v) in plane[row + xs.start..row + xs.end].iter().enumerate() {
                if v > best_v || (v.is_nan() && !best_v.is_nan()) {
                    best = row + xs.start + ix;
                    best_v = v;
                }
            }
        }
        best
    }
}

/// Max-pool forward: the value at [`PoolGeom::argmax`], that is the window's maximum, or NaN
/// if the window holds one. Separable (the maximum over the window's columns for every input
/// row, then over its rows) and branch-free, so that it vectorises.
pub fn max_pool_forward(g: &PoolGeom, x: &[f32]) -> Vec<f32> {
    let (ihw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut y = vec![0f32; g.planes * ohw];
    // A NaN, once in, stays: `v > NaN` is false.
    let keep = |m: f32, v: f32| if v > m || v.is_nan() { v } else { m };
    let xs: Vec<_> = (0..g.ow).map(|ox| g.window(ox, g.w)).collect();
    let ys: Vec<_> = (0..g.oh).map(|oy| g.window(oy, g.h)).collect();
    y.par_chunks_mut(ohw)
        .zip(x.par_chunks(ihw))
        .with_min_len(4)
        .for_each_init(
            || vec![0f32; g.h * g.ow],
            |rows, (yp, xp)| {
                for (row, out) in xp.chunks_exact(g.w).zip(rows.chunks_exact_mut(g.ow)) {
                    for (o, r) in out.iter_mut().zip(&xs) {
                        *o = row[r.clone()].iter().fold(row[r.start], |m, &v| keep(m, v));
                    }
                }
                for (out, r) in yp.chunks_exact_mut(g.ow).zip(&ys) {
                    out.copy_from_slice(&rows[r.start * g.ow..][..g.ow]);
                    for row in rows[(r.start + 1) * g.ow..r.end * g.ow].chunks_exact(g.ow) {
                        for (o, &v) in out.iter_mut().zip(row) {
                            *o = keep(*o, v);
                        }
                    }
                }
            },
        );
    y
}

/// Max-pool backward: each output's gradient goes to the first maximum of its window.
pub fn max_pool_backward(g: &PoolGeom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (ihw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![0f32; g.planes * ihw];
    dx.par_chunks_mut(ihw)
        .zip(x.par_chunks(ihw).zip(dy.par_chunks(ohw)))
        .for_each(|(dxp, (xp, dyp))| {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    dxp[g.argmax(xp, oy, ox)] += dyp[oy * g.ow + ox];
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution, the definition itself.
    fn naive(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; g.output_len()];
        for b in 0..g.b {
            for k in 0..g.k {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = 0.0;
                        for c in 0..g.c {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < g.h
                                        && (ix as usize) < g.w
                                    {
                                        s += x[((b * g.c + c) * g.h + iy as usize) * g.w
                                            + ix as usize]
                                            * w[((k * g.c + c) * g.kh + ky) * g.kw + kx];
                                    }
                                }
                            }
                        }
                        y[((b * g.k + k) * g.oh + oy) * g.ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn ramp(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(747796405).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_matches_direct_convolution() {
        for (b, c, h, w, k, ks, s, p) in [
            (1, 3, 7, 5, 4, 3, 1, 1),
            (2, 2, 9, 9, 3, 3, 2, 1),
            (3, 4, 6, 6, 5, 1, 1, 0),
            (2, 4, 7, 7, 5, 1, 2, 0),
            (1, 1, 11, 11, 2, 7, 2, 3),
            // Large enough for Winograd where AVX-512 is present.
            (2, 3, 9, 10, 5, 3, 1, 1),
        ] {
            let g = ConvGeom::new(b, c, h, w, k, ks, ks, s, p).unwrap();
            let x = ramp(g.input_len(), 1);
            let wt = ramp(g.weight_len(), 2);
            let want = naive(&g, &x, &wt);
            // The dispatching entry (AVX-512 kernels on this CPU, if present) and the GEMM path.
            let got = conv2d_forward(&g, &x, &wt, None, false, None);
            let gemm = conv2d_forward_gemm(&g, &x, &wt, None, false);
            for ((a, b), c) in got.iter().zip(&want).zip(&gemm) {
                assert!((a - b).abs() < 1e-4, "{g:?}: {a} vs {b}");
                assert!((c - b).abs() < 1e-4, "{g:?} gemm: {c} vs {b}");
            }
        }
    }

    /// ⟨conv(x), dy⟩ = ⟨x, conv_bwd_input(dy)⟩ = ⟨w, conv_bwd_weight(x, dy)⟩ (adjoint identities).
    #[test]
    fn gradients_are_adjoint_to_forward() {
        for (b, c, h, w, k, ks, s, p) in [
            (2, 3, 7, 6, 4, 3, 1, 1),
            (3, 2, 9, 9, 3, 3, 2, 1),
            (2, 4, 5, 5, 3, 1, 1, 0),
            (2, 3, 9, 8, 4, 3, 1, 1),
        ] {
            let g = ConvGeom::new(b, c, h, w, k, ks, ks, s, p).unwrap();
            let x = ramp(g.input_len(), 3);
            let wt = ramp(g.weight_len(), 4);
            let dy = ramp(g.output_len(), 5);
            let y = conv2d_forward(&g, &x, &wt, None, false, None);
            let lhs: f64 = y
                .iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            let dx = conv2d_backward_input(&g, &dy, &wt);
            let rx: f64 = x
                .iter()
                .zip(&dx)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            let dw = conv2d_backward_weight(&g, &x, &dy);
            let rw: f64 = wt
                .iter()
                .zip(&dw)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            assert!((lhs - rx).abs() < 1e-3 * lhs.abs().max(1.0), "{lhs} {rx}");
            let dx_gemm = conv2d_backward_input_gemm(&g, &dy, &wt);
            for (a, b) in dx.iter().zip(&dx_gemm) {
                assert!(
                    (a - b).abs() < 1e-3 * b.abs().max(1.0),
                    "{g:?} dx: {a} vs {b}"
                );
            }
            assert!((lhs - rw).abs() < 1e-3 * lhs.abs().max(1.0), "{lhs} {rw}");
        }
    }

    #[test]
    fn bias_relu_epilogue() {
        let g = ConvGeom::new(1, 1, 2, 2, 2, 1, 1, 1, 0).unwrap();
        let y = conv2d_forward(
            &g,
            &[1., -2., 3., -4.],
            &[1., -1.],
            Some(&[0.5, 0.0]),
            true,
            None,
        );
        assert_eq!(y, vec![1.5, 0., 3.5, 0., 0., 2., 0., 4.]);
    }

    /// A cache packing half-precision weights uses them only for maps of at most 16 positions,
    /// and keeps f32 for a layer whose weights do not fit half: the other layers give exactly
    /// the f32 results.
    #[test]
    fn half_weight_cache_scope() {
        if direct::skip_without_avx512("half_weight_cache_scope") {
            return;
        }
        let rand = crate::kernels::direct::tests::rand_vec;
        let run = |g: &ConvGeom, wt: &[f32], format| {
            let x = rand(g.input_len(), 1);
            let cache = PackedCache::new(format);
            conv2d_forward(g, &x, wt, None, false, Some(&cache))
        };
        let few = ConvGeom::new(1, 32, 3, 3, 32, 3, 3, 1, 1).unwrap();
        let mut wt = rand(few.weight_len(), 2);
        let (f32y, f16y) = (
            run(&few, &wt, WeightFormat::F32),
            run(&few, &wt, WeightFormat::F16),
        );
        assert_ne!(f32y, f16y, "few positions: half weights in use");
        wt[3] = 1e5;
        assert_eq!(
            run(&few, &wt, WeightFormat::F32),
            run(&few, &wt, WeightFormat::F16),
            "beyond half's range"
        );
        // The grid kernel (7x7 stride 2 on 48x48), Winograd (3x3 on 12x12) and the
        // few-positions kernel on 6x6 maps: f32 always.
        for g in [
            ConvGeom::new(1, 1, 48, 48, 64, 7, 7, 2, 3).unwrap(),
            ConvGeom::new(1, 64, 12, 12, 64, 3, 3, 1, 1).unwrap(),
            ConvGeom::new(2, 32, 6, 6, 32, 3, 3, 1, 1).unwrap(),
        ] {
            let wt = rand(g.weight_len(), 3);
            assert_eq!(
                run(&g, &wt, WeightFormat::F32),
                run(&g, &wt, WeightFormat::F16)
            );
        }
    }

    #[test]
    fn max_pool_overlapping_windows() {
        // 1 plane 4x4, 3x3 stride 2 pad 1 → 2x2.
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let g = PoolGeom::new(1, 4, 4, 3, 2, 1).unwrap();
        assert_eq!(max_pool_forward(&g, &x), vec![5., 7., 13., 15.]);
        let dx = max_pool_backward(&g, &x, &[1., 2., 3., 4.]);
        let mut want = vec![0f32; 16];
        want[5] = 1.;
        want[7] = 2.;
        want[13] = 3.;
        want[15] = 4.;
        assert_eq!(dx, want);
        // Overlap: the same input wins two windows and collects both gradients.
        let mut x = vec![0f32; 16];
        x[6] = 9.0; // row 1, col 2: inside windows (0,1) and (1,1)
        let dx = max_pool_backward(&g, &x, &[1., 1., 1., 1.]);
        assert_eq!(dx[6], 2.0);
        assert!(PoolGeom::new(1, 4, 4, 3, 2, 3).is_none());
    }

    /// Windows clipped at every border, against the definition: the first maximum over the
    /// in-bounds taps, a NaN winning; ties and NaNs planted.
    #[test]
    fn max_pool_matches_definition() {
        for (i, &(h, w, k, s, p)) in [
            (7, 5, 3, 2, 1),
            (6, 9, 2, 2, 0),
            (5, 5, 5, 3, 2),
            (1, 4, 3, 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let g = PoolGeom::new(2, h, w, k, s, p).expect("geom");
            let mut x: Vec<f32> = crate::kernels::direct::tests::rand_vec(2 * h * w, i as u64)
                .iter()
                .map(|v| (v * 4.0).round())
                .collect();
            x[3] = f32::NAN;
            let mut want = Vec::new();
            for plane in x.chunks(h * w) {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut best: Option<usize> = None;
                        for dy in 0..k {
                            for dx in 0..k {
                                let (iy, ix) =
                                    ((oy * s + dy).checked_sub(p), (ox * s + dx).checked_sub(p));
                                let (Some(iy), Some(ix)) = (iy, ix) else {
                                    continue;
                                };
                                if iy >= h || ix >= w {
                                    continue;
                                }
                                let v = plane[iy * w + ix];
                                let b = best.map(|b| plane[b]);
                                if b.is_none_or(|b| v > b || (v.is_nan() && !b.is_nan())) {
                                    best = Some(iy * w + ix);
                                }
                            }
                        }
                        want.push(best.expect("window"));
                    }
                }
            }
            let y = max_pool_forward(&g, &x);
            let ohw = g.oh * g.ow;
            for (j, &b) in want.iter().enumerate() {
                let v = x[j / ohw * h * w + b];
                assert!(
                    y[j] == v || (v.is_nan() && y[j].is_nan()),
                    "case {i} output {j}"
                );
            }
            let dy: Vec<f32> = (0..y.len()).map(|j| j as f32 + 1.0).collect();
            let mut dx_want = vec![0f32; x.len()];
            for (j, &b) in want.iter().enumerate() {
                dx_want[j / ohw * h * w + b] += dy[j];
            }
            assert_eq!(max_pool_backward(&g, &x, &dy), dx_want, "case {i}");
        }
    }
}

/// Inference parameters of a CBAM gate (`crate::model::cbam`), batch-norm folded into the
/// spatial conv.
#[derive(Debug, Clone, PartialEq)]
pub struct CbamParams {
    pub channels: usize,
    pub hidden: usize,
    /// `(hidden, channels)` row-major, and bias `(hidden,)`.
    pub fc1_w: Vec<f32>,
    pub fc1_b: Vec<f32>,
    /// fc2's weight transposed, `(hidden, channels)` row-major (so the gate is a sum of
    /// `hidden` scaled rows: vectorised over channels), and bias `(channels,)`.
    pub fc2_wt: Vec<f32>,
    pub fc2_b: Vec<f32>,
    /// Spatial conv `(1, 2, k, k)` with BN folded in, and its bias.
    pub spatial_w: Vec<f32>,
    pub spatial_b: f32,
    pub spatial_k: usize,
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CbamParams {
    /// The channel gate before its sigmoid, `MLP(avg) + MLP(max)`. The second layer is
    /// linear, so both branches go through it in one pass: `fc2·(h_avg + h_max) + 2·b2`.
    fn gate_logits(&self, avg: &[f32], max: &[f32]) -> Vec<f32> {
        let (c, hidden) = (self.channels, self.hidden);
        // Vectorised dot products (`lane_sums`); a single running sum is a scalar chain.
        let h: Vec<f32> = (0..hidden)
            .map(|j| {
                let (row, b) = (&self.fc1_w[j * c..(j + 1) * c], self.fc1_b[j]);
                let [sa, sm] = lane_sums([row, avg, max], |[w, a, m]| [w * a, w * m]);
                (sa as f32 + b).max(0.0) + (sm as f32 + b).max(0.0)
            })
            .collect();
        let mut out: Vec<f32> = self.fc2_b.iter().map(|b| 2.0 * b).collect();
        for (&hj, row) in h.iter().zip(self.fc2_wt.chunks_exact(c)) {
            for (o, &w) in out.iter_mut().zip(row) {
                *o += hj * w;
            }
        }
        out
    }

    /// The spatial attention map `sigmoid(conv_k([mean; max]))` of one image from its pooled
    /// maps `[mean; max]` (`2·h·w` floats), zero-padded. The maps are copied into padded
    /// planes first, so that every tap is a full-width row update (vectorised).
    fn spatial(&self, pooled: &[f32], h: usize, w: usize) -> Vec<f32> {
        let k = self.spatial_k;
        let pad = k / 2;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let mut padded = vec![0f32; 2 * hp * wp];
        for (dst, map) in padded
            .chunks_exact_mut(hp * wp)
            .zip(pooled.chunks_exact(h * w))
        {
            for (drow, srow) in dst[pad * wp..]
                .chunks_exact_mut(wp)
                .zip(map.chunks_exact(w))
            {
                drow[pad..pad + w].copy_from_slice(srow);
            }
        }
        let mut att = vec![self.spatial_b; h * w];
        for (y, dst) in att.chunks_exact_mut(w).enumerate() {
            for (map, wk) in padded
                .chunks_exact(hp * wp)
                .zip(self.spatial_w.chunks_exact(k * k))
            {
                for (ky, wrow) in wk.chunks_exact(k).enumerate() {
                    let src = &map[(y + ky) * wp..][..wp];
                    for (kx, &wv) in wrow.iter().enumerate() {
                        for (d, &v) in dst.iter_mut().zip(&src[kx..kx + w]) {
                            *d += wv * v;
                        }
                    }
                }
            }
        }
        att.iter_mut().for_each(|a| *a = sigmoid(*a));
        att
    }
}

/// `relu(CBAM(x) + identity)` over a batch `(b, c, h, w)` (inference only), on the training
/// path's fused loops ([`cbam_train`]): each pass split over images and over blocks of channels
/// or pixels, so that a single image keeps every core busy.
pub fn cbam_residual_relu(
    p: &CbamParams,
    x: &[f32],
    identity: &[f32],
    b: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let d = MapGeom {
        b,
        c: p.channels,
        hw: h * w,
    };
    assert_eq!(x.len(), d.len());
    assert_eq!(identity.len(), d.len());
    if d.is_empty() {
        return Vec::new();
    }
    let stats = cbam_train::channel_mean_max(&d, x);
    let gates: Vec<f32> = stats
        .chunks_exact(2 * d.c)
        .flat_map(|s| {
            let (avg, max) = s.split_at(d.c);
            let mut g = p.gate_logits(avg, max);
            g.iter_mut().for_each(|v| *v = sigmoid(*v));
            g
        })
        .collect();
    let pooled = cbam_train::gate_pool(&d, x, &gates);
    let att: Vec<f32> = pooled
        .par_chunks(2 * d.hw)
        .flat_map_iter(|pi| p.spatial(pi, h, w))
        .collect();
    cbam_train::apply(&d, x, identity, &gates, &att)
}
