//! The element-wise and channel-reduction parts of a CBAM gate in training, fused into two passes
//! forward and two backward over `(b, c, h·w)` `f32` slices. The small parts (pooling over space,
//! the channel MLP, the 7x7 spatial convolution and its batch-norm) stay ordinary ops. The
//! inference gate ([`cbam_residual_relu`]) runs the same forward loops.
//!
//! With the channel gate `g (b, c)` and the spatial gate `s (b, h·w)`:
//! - gate-and-pool: `x' = x·g`, `pooled = [mean_c x', max_c x']` (`(b, 2, h·w)`);
//! - apply: `out = relu(x·g·s + identity)`.
//!
//! Gradients follow candle's conventions, so that the fused path matches the composed one: the
//! max passes its gradient to every element equal to the maximum.

use rayon::prelude::*;

use super::geom::MapGeom;
use super::lane_sums;

avx512_twins! {
    /// Per-image loops.
    img, img512;

    /// `[mean_c x·g, max_c x·g]` for pixels `p0..p0 + mean.len()` of one image, into `mean`
    /// and `max`.
    pub fn gate_pool(
        x: &[f32],
        g: &[f32],
        hw: usize,
        p0: usize,
        mean: &mut [f32],
        max: &mut [f32],
    ) {
        let n = mean.len();
        mean.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        for (xc, &gc) in x.chunks_exact(hw).zip(g) {
            for ((m, mx), &v) in mean.iter_mut().zip(max.iter_mut()).zip(&xc[p0..p0 + n]) {
                let v = v * gc;
                *m += v;
                *mx = mx.max(v);
            }
        }
        let inv = 1.0 / g.len().max(1) as f32;
        mean.iter_mut().for_each(|m| *m *= inv);
    }

    /// Backward of [`gate_pool`]: `dx` and `dg` from `dpooled`; `mx` is scratch of `hw` floats.
    pub fn gate_pool_bwd(
        x: &[f32],
        g: &[f32],
        dpooled: &[f32],
        hw: usize,
        mx: &mut [f32],
        dx: &mut [f32],
        dg: &mut [f32],
    ) {
        mx.fill(f32::NEG_INFINITY);
        for (xc, &gc) in x.chunks_exact(hw).zip(g) {
            for (m, &v) in mx.iter_mut().zip(xc) {
                *m = m.max(v * gc);
            }
        }
        let (dmean, dmax) = (&dpooled[..hw], &dpooled[hw..2 * hw]);
        let mx = &mx[..hw];
        let inv = 1.0 / g.len().max(1) as f32;
        for (((xc, dxc), &gc), dgc) in x
            .chunks_exact(hw)
            .zip(dx.chunks_exact_mut(hw))
            .zip(g)
            .zip(dg.iter_mut())
        {
            // The gradient through the pooled maps at a position: (x, max, dmean, dmax) → d1.
            let d1 = |[v, m, dm, dmx]: [f32; 4]| dm * inv + if v * gc == m { dmx } else { 0.0 };
            for ((((d, &v), &m), &dm), &dmx) in dxc.iter_mut().zip(xc).zip(mx).zip(dmean).zip(dmax)
            {
                *d = d1([v, m, dm, dmx]) * gc;
            }
            *dgc = crate::kernels::lane_sums([xc, mx, dmean, dmax], |a| [d1(a) * a[0]])[0] as f32;
        }
    }

    /// `out = relu(x·g·s + identity)` for one image.
    pub fn apply(x: &[f32], id: &[f32], g: &[f32], s: &[f32], hw: usize, out: &mut [f32]) {
        for (((xc, ic), oc), &gc) in x
            .chunks_exact(hw)
            .zip(id.chunks_exact(hw))
            .zip(out.chunks_exact_mut(hw))
            .zip(g)
        {
            for (((o, &v), &i), &sv) in oc.iter_mut().zip(xc).zip(ic).zip(s) {
                *o = (v * gc * sv + i).max(0.0);
            }
        }
    }

    /// Mean, maximum and index of the first maximum of one plane.
    pub fn plane_pool(x: &[f32]) -> (f32, f32, usize) {
        let (mean, m) = plane_mean_max(x);
        let at = x.iter().position(|&v| v == m).unwrap_or(0);
        (mean, m, at)
    }

    /// Mean and maximum of one plane (16 running sums and maxima, so that the loop
    /// vectorises).
    pub fn plane_mean_max(x: &[f32]) -> (f32, f32) {
        let (mut sum, mut max) = ([0f32; 16], [f32::NEG_INFINITY; 16]);
        let chunks = x.chunks_exact(16);
        let rest = chunks.remainder();
        for ch in chunks {
            for l in 0..16 {
                sum[l] += ch[l];
                max[l] = max[l].max(ch[l]);
            }
        }
        let (mut s, mut m) = (0f32, f32::NEG_INFINITY);
        for (&a, &b) in sum.iter().zip(&max) {
            s += a;
            m = m.max(b);
        }
        for &v in rest {
            s += v;
            m = m.max(v);
        }
        (s / x.len().max(1) as f32, m)
    }

    /// Backward of [`apply`] from its output `out` and `dout`: `dx`, `d identity`, `dg`, `ds`.
    pub fn apply_bwd(
        x: &[f32],
        out: &[f32],
        dout: &[f32],
        g: &[f32],
        s: &[f32],
        hw: usize,
        dx: &mut [f32],
        did: &mut [f32],
        dg: &mut [f32],
        ds: &mut [f32],
    ) {
        let (s, ds) = (&s[..hw], &mut ds[..hw]);
        ds.fill(0.0);
        for (k, &gc) in g.iter().enumerate() {
            let r = k * hw..(k + 1) * hw;
            let (xc, oc, doc) = (&x[r.clone()], &out[r.clone()], &dout[r.clone()]);
            let (dxc, dic) = (&mut dx[r.clone()], &mut did[r]);
            for i in 0..hw {
                let dz = if oc[i] > 0.0 { doc[i] } else { 0.0 };
                dic[i] = dz;
                dxc[i] = dz * gc * s[i];
                ds[i] += dz * xc[i] * gc;
            }
            dg[k] = crate::kernels::lane_sums([dic, xc, s], |[dz, v, sv]| [dz * v * sv])[0] as f32;
        }
    }
}

/// CBAM's channel-attention pooling: per channel of `x (b, c, hw)` the spatial mean, the maximum
/// and the index of the first maximum (as f32, exact below 2²⁴), laid out `(b, 3, c)`. The
/// indices are for [`channel_pool_backward`].
pub fn channel_pool(d: &MapGeom, x: &[f32]) -> Vec<f32> {
    per_plane(d, x, |xc| {
        let (a, m, i) = avx512_or!(img512, img, plane_pool(xc));
        [a, m, i as f32]
    })
}

/// `f` of every channel plane of `x (b, c, hw)`, laid out `(b, W, c)`: value `w` of channel
/// `k` of image `n` at `(n·W + w)·c + k`. The planes are split across the cores in runs of at
/// least [`min_items`], so that a single image is too; zeros where there are no pixels.
fn per_plane<const W: usize>(
    d: &MapGeom,
    x: &[f32],
    f: impl Fn(&[f32]) -> [f32; W] + Sync + Send,
) -> Vec<f32> {
    assert_eq!(x.len(), d.len());
    let mut out = vec![0f32; d.b * W * d.c];
    if d.is_empty() {
        return out;
    }
    let stats: Vec<[f32; W]> = x
        .par_chunks(d.hw)
        .with_min_len(min_items(d.hw))
        .map(f)
        .collect();
    for (o, s) in out.chunks_exact_mut(W * d.c).zip(stats.chunks_exact(d.c)) {
        for (k, v) in s.iter().enumerate() {
            for (w, &val) in v.iter().enumerate() {
                o[w * d.c + k] = val;
            }
        }
    }
    out
}
/// Backward of [`channel_pool`] from its output and `dpooled (b, 3, c)` (the index row's
/// gradient is ignored): the mean's gradient spread evenly over the plane, the maximum's to the
/// first maximum. (Candle's `max` splits it among tied maxima; ties have measure zero here.)
pub fn channel_pool_backward(d: &MapGeom, pooled: &[f32], dpooled: &[f32]) -> Vec<f32> {
    assert!(pooled.len() == d.b * 3 * d.c && dpooled.len() == pooled.len());
    let mut dx = vec![0f32; d.len()];
    let img = d.c * d.hw;
    if img > 0 {
        let inv = 1.0 / d.hw as f32;
        dx.par_chunks_mut(img)
            .zip(pooled.par_chunks(3 * d.c).zip(dpooled.par_chunks(3 * d.c)))
            .for_each(|(dxi, (p, dp))| {
                for (k, dxc) in dxi.chunks_exact_mut(d.hw).enumerate() {
                    dxc.fill(dp[k] * inv);
                    let at = (p[2 * d.c + k] as usize).min(d.hw - 1);
                    dxc[at] += dp[d.c + k];
                }
            });
    }
    dx
}

/// `[mean_c x·g, max_c x·g]`: `(b, 2, hw)` from `x (b, c, hw)` and `g (b, c)`.
pub fn gate_pool(d: &MapGeom, x: &[f32], g: &[f32]) -> Vec<f32> {
    assert!(x.len() == d.len() && g.len() == d.b * d.c);
    let mut pooled = vec![0f32; d.b * 2 * d.hw];
    let img = d.c * d.hw;
    if img > 0 {
        // Blocks of pixels, so that a single image is split across the cores too.
        let blk = PIXEL_BLOCK.min(d.hw);
        pooled
            .par_chunks_mut(2 * d.hw)
            .zip(x.par_chunks(img).zip(g.par_chunks(d.c)))
            .with_min_len(min_items(img))
            .for_each(|(p, (xi, gi))| {
                let (mean, max) = p.split_at_mut(d.hw);
                mean.par_chunks_mut(blk)
                    .zip(max.par_chunks_mut(blk))
                    .enumerate()
                    .with_min_len(min_items(blk * d.c))
                    .for_each(|(i, (m, mx))| {
                        avx512_or!(img512, img, gate_pool(xi, gi, d.hw, i * blk, m, mx))
                    });
            });
    }
    pooled
}

/// Pixels per work item of [`gate_pool`].
const PIXEL_BLOCK: usize = 512;

/// Channels per work item of [`apply`], at most.
const CHANNEL_BLOCK: usize = 16;

/// How many work items of `floats` floats each a core takes on its own: together at least
/// 32 Ki floats, below which waking another core costs more than the work (the last stages'
/// gates at batch 1 are a few thousand floats).
fn min_items(floats: usize) -> usize {
    ((1 << 15) / floats.max(1)).max(1)
}

/// Per channel of `x (b, c, hw)` the spatial mean and maximum, laid out `(b, 2, c)`: CBAM's
/// channel-attention pooling at inference.
pub fn channel_mean_max(d: &MapGeom, x: &[f32]) -> Vec<f32> {
    per_plane(d, x, |xc| {
        let (a, m) = avx512_or!(img512, img, plane_mean_max(xc));
        [a, m]
    })
}
/// Backward of [`gate_pool`]: `(dx, dg)`.
pub fn gate_pool_backward(
    d: &MapGeom,
    x: &[f32],
    g: &[f32],
    dpooled: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    assert!(x.len() == d.len() && g.len() == d.b * d.c && dpooled.len() == d.b * 2 * d.hw);
    // dx has room for dg after it: the custom op returns them as one buffer.
    let (mut dx, mut dg) = (
        super::zeros_with_room(d.len(), d.b * d.c),
        vec![0f32; d.b * d.c],
    );
    let img = d.c * d.hw;
    if img > 0 {
        dx.par_chunks_mut(img)
            .zip(dg.par_chunks_mut(d.c))
            .zip(x.par_chunks(img).zip(g.par_chunks(d.c)))
            .zip(dpooled.par_chunks(2 * d.hw))
            .for_each_init(
                || vec![0f32; d.hw],
                |mx, (((dxi, dgi), (xi, gi)), dpi)| {
                    avx512_or!(img512, img, gate_pool_bwd(xi, gi, dpi, d.hw, mx, dxi, dgi))
                },
            );
    }
    (dx, dg)
}

/// `relu(x·g·s + identity)` with `g (b, c)` and `s (b, hw)`.
pub fn apply(d: &MapGeom, x: &[f32], id: &[f32], g: &[f32], s: &[f32]) -> Vec<f32> {
    assert!(x.len() == d.len() && id.len() == d.len());
    assert!(g.len() == d.b * d.c && s.len() == d.b * d.hw);
    let mut out = vec![0f32; d.len()];
    let img = d.c * d.hw;
    if img > 0 {
        // Blocks of channels, so that a single image is split across the cores too.
        let cb = CHANNEL_BLOCK * d.hw;
        out.par_chunks_mut(img)
            .zip(x.par_chunks(img).zip(id.par_chunks(img)))
            .zip(g.par_chunks(d.c).zip(s.par_chunks(d.hw)))
            .with_min_len(min_items(img))
            .for_each(|((o, (xi, ii)), (gi, si))| {
                o.par_chunks_mut(cb)
                    .zip(xi.par_chunks(cb).zip(ii.par_chunks(cb)))
                    .zip(gi.par_chunks(CHANNEL_BLOCK))
                    .with_min_len(min_items(cb))
                    .for_each(|((o, (xb, ib)), gb)| {
                        avx512_or!(img512, img, apply(xb, ib, gb, si, d.hw, o))
                    });
            });
    }
    out
}

/// Backward of [`apply`] from its output: `[dx | d identity | dg | ds]` in one buffer (the
/// custom op's flat output, so nothing is copied after).
pub fn apply_backward(
    d: &MapGeom,
    x: &[f32],
    out: &[f32],
    dout: &[f32],
    g: &[f32],
    s: &[f32],
) -> Vec<f32> {
    assert!(x.len() == d.len() && out.len() == d.len() && dout.len() == d.len());
    assert!(g.len() == d.b * d.c && s.len() == d.b * d.hw);
    let mut flat = vec![0f32; 2 * d.len() + d.b * (d.c + d.hw)];
    let (dx, rest) = flat.split_at_mut(d.len());
    let (did, rest) = rest.split_at_mut(d.len());
    let (dg, ds) = rest.split_at_mut(d.b * d.c);
    let img = d.c * d.hw;
    if img > 0 {
        dx.par_chunks_mut(img)
            .zip(did.par_chunks_mut(img))
            .zip(dg.par_chunks_mut(d.c).zip(ds.par_chunks_mut(d.hw)))
            .zip(x.par_chunks(img).zip(out.par_chunks(img)))
            .zip(
                dout.par_chunks(img)
                    .zip(g.par_chunks(d.c).zip(s.par_chunks(d.hw))),
            )
            .for_each(|((((dxi, didi), (dgi, dsi)), (xi, oi)), (doi, (gi, si)))| {
                avx512_or!(
                    img512,
                    img,
                    apply_bwd(xi, oi, doi, gi, si, d.hw, dxi, didi, dgi, dsi)
                )
            });
    }
    flat
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
/// path's fused loops (above): each pass split over images and over blocks of channels
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
    let stats = channel_mean_max(&d, x);
    let gates: Vec<f32> = stats
        .chunks_exact(2 * d.c)
        .flat_map(|s| {
            let (avg, max) = s.split_at(d.c);
            let mut g = p.gate_logits(avg, max);
            g.iter_mut().for_each(|v| *v = sigmoid(*v));
            g
        })
        .collect();
    let pooled = gate_pool(&d, x, &gates);
    let att: Vec<f32> = pooled
        .par_chunks(2 * d.hw)
        .flat_map_iter(|pi| p.spatial(pi, h, w))
        .collect();
    apply(&d, x, identity, &gates, &att)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000;
                v as f32 / 250.0 - 2.0
            })
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Analytic gradients of `Σ w·f` against central differences, for both halves.
    #[test]
    fn backward_matches_finite_differences() {
        let d = MapGeom { b: 2, c: 3, hw: 5 };
        // Channels apart by more than the step, so the max over channels has no kink in reach.
        let x: Vec<f32> = data(d.len(), 1)
            .iter()
            .enumerate()
            .map(|(i, v)| v + 5.0 * ((i / d.hw) % d.c) as f32)
            .collect();
        let id = data(d.len(), 2);
        let g: Vec<f32> = data(d.b * d.c, 3)
            .iter()
            .map(|v| 0.5 + v.abs() / 4.0)
            .collect();
        let s: Vec<f32> = data(d.b * d.hw, 4)
            .iter()
            .map(|v| 0.2 + v.abs() / 3.0)
            .collect();
        let h = 1e-2f32;
        let close = |num: f64, ana: f32, what: &str| {
            assert!(
                (num - ana as f64).abs() < 1e-2 * (1.0 + num.abs()),
                "{what}: numeric {num} analytic {ana}"
            );
        };
        // Gate and pool.
        let wp = data(d.b * 2 * d.hw, 5);
        let f = |x: &[f32], g: &[f32]| dot(&gate_pool(&d, x, g), &wp);
        let (dx, dg) = gate_pool_backward(&d, &x, &g, &wp);
        for i in [0, 4, 7, 13, 22, 29] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            close(
                (f(&xp, &g) - f(&xm, &g)) / (2.0 * h as f64),
                dx[i],
                &format!("pool dx[{i}]"),
            );
        }
        for i in 0..g.len() {
            let (mut gp, mut gm) = (g.clone(), g.clone());
            gp[i] += h;
            gm[i] -= h;
            close(
                (f(&x, &gp) - f(&x, &gm)) / (2.0 * h as f64),
                dg[i],
                &format!("pool dg[{i}]"),
            );
        }
        // Apply.
        let wa = data(d.len(), 6);
        let fa = |x: &[f32], id: &[f32], g: &[f32], s: &[f32]| dot(&apply(&d, x, id, g, s), &wa);
        let out = apply(&d, &x, &id, &g, &s);
        let flat = apply_backward(&d, &x, &out, &wa, &g, &s);
        let (dx, rest) = flat.split_at(d.len());
        let (did, rest) = rest.split_at(d.len());
        let (dg, ds) = rest.split_at(d.b * d.c);
        for i in [0, 5, 11, 18, 26] {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            let num = (fa(&p, &id, &g, &s) - fa(&m, &id, &g, &s)) / (2.0 * h as f64);
            close(num, dx[i], &format!("apply dx[{i}]"));
            let (mut p, mut m) = (id.clone(), id.clone());
            p[i] += h;
            m[i] -= h;
            let num = (fa(&x, &p, &g, &s) - fa(&x, &m, &g, &s)) / (2.0 * h as f64);
            close(num, did[i], &format!("apply did[{i}]"));
        }
        for i in 0..g.len() {
            let (mut p, mut m) = (g.clone(), g.clone());
            p[i] += h;
            m[i] -= h;
            let num = (fa(&x, &id, &p, &s) - fa(&x, &id, &m, &s)) / (2.0 * h as f64);
            close(num, dg[i], &format!("apply dg[{i}]"));
        }
        for i in 0..s.len() {
            let (mut p, mut m) = (s.clone(), s.clone());
            p[i] += h;
            m[i] -= h;
            let num = (fa(&x, &id, &g, &p) - fa(&x, &id, &g, &m)) / (2.0 * h as f64);
            close(num, ds[i], &format!("apply ds[{i}]"));
        }
    }
}
