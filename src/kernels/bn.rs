//! Training-mode batch-norm (optionally followed by ReLU) as one pass forward and three passes
//! backward over NCHW `f32` slices, instead of the dozen element-wise tensor ops (and their
//! gradients) that a composed batch-norm costs.
//!
//! With `x̂ = (x − μ)/σ` over the `N = b·h·w` values of a channel (biased variance, as training
//! batch-norm normalises), `y = relu?(γ·x̂ + β)` and `dz = dy·[y > 0]` (or `dy`):
//! `dβ = Σ dz`, `dγ = Σ dz·x̂`, `dx = γ/σ · (dz − dβ/N − x̂·dγ/N)`.
//! Channel sums are accumulated in 16 f32 lanes within an image plane and in f64 across planes.

use rayon::prelude::*;

use super::geom::MapGeom;

avx512_twins! {
    /// Per-plane loops, written branch-free so that they vectorise.
    plane, plane512;

    /// `Σ x`, or `Σ (x − mean)²` when `mean` is given.
    pub fn sum(p: &[f32], mean: Option<f32>) -> f64 {
        match mean {
            None => crate::kernels::lane_sums([p], |[v]| [v])[0],
            Some(m) => crate::kernels::lane_sums([p], |[v]| [(v - m) * (v - m)])[0],
        }
    }

    /// `y = relu?(x·scale + shift)`.
    pub fn forward(xp: &[f32], yp: &mut [f32], scale: f32, shift: f32, relu: bool) {
        if relu {
            for (o, &v) in yp.iter_mut().zip(xp) {
                *o = (v * scale + shift).max(0.0);
            }
        } else {
            for (o, &v) in yp.iter_mut().zip(xp) {
                *o = v * scale + shift;
            }
        }
    }

    /// `(Σ dz, Σ dz·x̂)` with `x̂ = (x − m)·iv` and `dz = dy` masked where `γ·x̂ + β <= 0` (ReLU).
    pub fn grad_sums(
        xp: &[f32],
        dp: &[f32],
        m: f32,
        iv: f32,
        gm: f32,
        bt: f32,
        relu: bool,
    ) -> (f64, f64) {
        let [s, sx] = crate::kernels::lane_sums([xp, dp], |[v, d]| {
            let xh = (v - m) * iv;
            let keep = !relu || gm * xh + bt > 0.0;
            let dz = if keep { d } else { 0.0 };
            [dz, dz * xh]
        });
        (s, sx)
    }

    /// `dx = k·(dz − mb − x̂·mg)`.
    pub fn dx(
        xp: &[f32],
        dp: &[f32],
        out: &mut [f32],
        stats: (f32, f32, f32, f32),
        coef: (f32, f32, f32),
        relu: bool,
    ) {
        let ((m, iv, gm, bt), (k, mb, mg)) = (stats, coef);
        for ((o, &v), &d) in out.iter_mut().zip(xp).zip(dp) {
            let xh = (v - m) * iv;
            let keep = !relu || gm * xh + bt > 0.0;
            *o = k * ((if keep { d } else { 0.0 }) - mb - xh * mg);
        }
    }
}

/// Per-channel mean and biased variance (two passes: mean, then centred squares).
pub fn channel_stats(g: &MapGeom, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), g.len());
    let n = g.n().max(1) as f64;
    (0..g.c)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = g
                .planes(x, c)
                .map(|p| avx512_or!(plane512, plane, sum(p, None)))
                .sum();
            let mean = (sum / n) as f32;
            let sq: f64 = g
                .planes(x, c)
                .map(|p| avx512_or!(plane512, plane, sum(p, Some(mean))))
                .sum();
            (mean, (sq / n) as f32)
        })
        .unzip()
}

/// `1/√(var + eps)` per channel.
fn inv_std(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
        .collect()
}

/// Forward: `relu?(γ·(x − μ)/σ + β)` with the batch statistics, which are returned as well
/// (`mean`, biased `var`) for the running averages.
pub fn forward(
    g: &MapGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(gamma.len() == g.c && beta.len() == g.c);
    let (mean, var) = channel_stats(g, x);
    let inv = inv_std(&var, eps);
    let mut y = vec![0f32; g.len()];
    if g.hw > 0 {
        y.par_chunks_mut(g.hw)
            .zip(x.par_chunks(g.hw))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let c = i % g.c;
                let scale = gamma[c] * inv[c];
                let shift = beta[c] - mean[c] * scale;
                avx512_or!(plane512, plane, forward(xp, yp, scale, shift, relu));
            });
    }
    (y, mean, var)
}

/// Backward: `(dx, dγ, dβ)` from the input `x` and the output gradient `dy`. `stats` are the
/// batch statistics [`forward`] returned for this `x`; they are recomputed when absent.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &MapGeom,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: Option<(&[f32], &[f32])>,
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(x.len() == g.len() && dy.len() == g.len());
    assert!(gamma.len() == g.c && beta.len() == g.c);
    let (mean, var) = match stats {
        Some((m, v)) if m.len() == g.c && v.len() == g.c => (m.to_vec(), v.to_vec()),
        _ => channel_stats(g, x),
    };
    let inv = inv_std(&var, eps);
    // Per channel: Σ dz and Σ dz·x̂, where dz is dy masked by the ReLU (γ·x̂ + β > 0).
    let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = (0..g.c)
        .into_par_iter()
        .map(|c| {
            let (m, iv, gm, bt) = (mean[c], inv[c], gamma[c], beta[c]);
            let (mut s, mut sx) = (0f64, 0f64);
            for (xp, dp) in g.planes(x, c).zip(g.planes(dy, c)) {
                let (a, b) = avx512_or!(plane512, plane, grad_sums(xp, dp, m, iv, gm, bt, relu));
                s += a;
                sx += b;
            }
            (s as f32, sx as f32)
        })
        .unzip();
    let n = g.n().max(1) as f32;
    // dx has room for dγ and dβ after it: the custom op returns all three as one buffer.
    let mut dx = super::zeros_with_room(g.len(), 2 * g.c);
    if g.hw > 0 {
        dx.par_chunks_mut(g.hw)
            .zip(x.par_chunks(g.hw).zip(dy.par_chunks(g.hw)))
            .enumerate()
            .for_each(|(i, (dxp, (xp, dp)))| {
                let c = i % g.c;
                let k = gamma[c] * inv[c];
                let (mb, mg) = (dbeta[c] / n, dgamma[c] / n);
                let stats = (mean[c], inv[c], gamma[c], beta[c]);
                avx512_or!(plane512, plane, dx(xp, dp, dxp, stats, (k, mb, mg), relu));
            });
    }
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 250.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn forward_normalises_each_channel() {
        let g = MapGeom { b: 3, c: 2, hw: 5 };
        let x = data(g.len(), 1);
        let (y, mean, var) = forward(&g, &x, &[1.0, 2.0], &[0.0, -1.0], 1e-5, false);
        for c in 0..2 {
            let vals: Vec<f32> = g.planes(&y, c).flatten().copied().collect();
            let m = vals.iter().sum::<f32>() / vals.len() as f32;
            let v = vals.iter().map(|v| (v - m).powi(2)).sum::<f32>() / vals.len() as f32;
            let (gm, gb) = ([1.0f32, 2.0][c], [0.0f32, -1.0][c]);
            assert!((m - gb).abs() < 1e-5, "channel {c} mean {m}");
            assert!((v - gm * gm).abs() < 1e-3, "channel {c} var {v}");
            let xs: Vec<f32> = g.planes(&x, c).flatten().copied().collect();
            let xm = xs.iter().sum::<f32>() / xs.len() as f32;
            assert!((mean[c] - xm).abs() < 1e-6);
            assert!(var[c] > 0.0);
        }
    }

    /// The analytic gradient against central differences of `Σ w·y`.
    #[test]
    fn backward_matches_finite_differences() {
        let g = MapGeom { b: 2, c: 3, hw: 4 };
        let x = data(g.len(), 7);
        let w = data(g.len(), 3);
        let gamma = [0.7f32, -1.2, 1.5];
        let beta = [0.1f32, 0.3, -0.4];
        for relu in [false, true] {
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
                let (y, _, _) = forward(&g, x, gamma, beta, 1e-5, relu);
                y.iter()
                    .zip(&w)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum()
            };
            let (dx, dgamma, dbeta) = backward(&g, &x, &w, &gamma, &beta, None, 1e-5, relu);
            // With the forward's statistics handed over: the same result, bit for bit.
            let (_, mean, var) = forward(&g, &x, &gamma, &beta, 1e-5, relu);
            let given = backward(&g, &x, &w, &gamma, &beta, Some((&mean, &var)), 1e-5, relu);
            assert_eq!(given, (dx.clone(), dgamma.clone(), dbeta.clone()));
            let h = 1e-2f32;
            let check = |num: f64, ana: f32, what: &str| {
                assert!(
                    (num - ana as f64).abs() < 2e-2 * (1.0 + num.abs()),
                    "relu={relu} {what}: numeric {num} analytic {ana}"
                );
            };
            for i in [0, 5, 11, 17, 23] {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                let num = (loss(&xp, &gamma, &beta) - loss(&xm, &gamma, &beta)) / (2.0 * h as f64);
                check(num, dx[i], &format!("dx[{i}]"));
            }
            for c in 0..3 {
                let (mut gp, mut gm) = (gamma, gamma);
                gp[c] += h;
                gm[c] -= h;
                let num = (loss(&x, &gp, &beta) - loss(&x, &gm, &beta)) / (2.0 * h as f64);
                check(num, dgamma[c], &format!("dgamma[{c}]"));
                let (mut bp, mut bm) = (beta, beta);
                bp[c] += h;
                bm[c] -= h;
                let num = (loss(&x, &gamma, &bp) - loss(&x, &gamma, &bm)) / (2.0 * h as f64);
                check(num, dbeta[c], &format!("dbeta[{c}]"));
            }
        }
    }
}
