//! CPU reference kernels for 2-D convolution (forward, input gradient, weight gradient) and
//! max-pooling with its backward, on contiguous NCHW `f32` slices; and max-pooling from candle's
//! ops ([`max_pool2d_candle`]), for tensors the CPU kernels do not take.
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

use super::geom::{ConvGeom, PoolGeom, SharedOut};

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

/// Max-pool with square `kernel`, `stride`, padding `pad` (−∞) from candle's differentiable ops:
/// the reference of [`max_pool_forward`] and [`max_pool_backward`] for any device and dtype.
///
/// candle's own max-pool has no padding and no backward for overlapping windows, so this is the
/// element-wise maximum of the `kernel²` shifted views at stride 1, then every `stride`-th row
/// and column.
pub fn max_pool2d_candle(
    xs: &candle_core::Tensor,
    kernel: usize,
    stride: usize,
    pad: usize,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{Result, Tensor};
    let (b, c, h, w) = xs.dims4()?;
    let g = PoolGeom::new(b * c, h, w, kernel, stride, pad).ok_or_else(|| {
        candle_core::Error::Msg(format!("max-pool {kernel}x{kernel} does not fit {h}x{w}"))
    })?;
    let xs = if pad > 0 {
        let fill = |hh: usize, ww: usize| {
            Tensor::full(f32::MIN, (b, c, hh, ww), xs.device())?.to_dtype(xs.dtype())
        };
        let row = fill(pad, w)?;
        let xs = Tensor::cat(&[&row, xs, &row], 2)?;
        let col = fill(h + 2 * pad, pad)?;
        Tensor::cat(&[&col, &xs, &col], 3)?
    } else {
        xs.clone()
    };
    // Stride-1 maxima over the window.
    let (h1, w1) = (h + 2 * pad - kernel + 1, w + 2 * pad - kernel + 1);
    let mut m: Option<Tensor> = None;
    for dy in 0..kernel {
        for dx in 0..kernel {
            let v = xs.narrow(2, dy, h1)?.narrow(3, dx, w1)?;
            m = Some(match m {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    let m = m.ok_or_else(|| candle_core::Error::Msg("max-pool: empty kernel".into()))?;
    // Subsample: keep rows/cols 0, s, 2s, ... via pad-reshape-narrow.
    let sub = |t: Tensor, dim: usize, len: usize, out: usize| -> Result<Tensor> {
        let full = out * stride;
        let t = if full > len {
            t.pad_with_zeros(dim, 0, full - len)?
        } else {
            t.narrow(dim, 0, full)?
        };
        let mut shape = t.dims().to_vec();
        shape[dim] = out;
        shape.insert(dim + 1, stride);
        t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
    };
    let m = sub(m, 2, h1, g.oh)?;
    sub(m, 3, w1, g.ow)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The per-layer dispatcher is checked here against the definition too.
    use crate::kernels::conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward};

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
            let mut x: Vec<f32> = crate::kernels::test_util::rand_vec(2 * h * w, i as u64)
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
