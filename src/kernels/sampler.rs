//! The CARD sampler as one CPU kernel: every face × sample × step of the few-step reverse chain
//! through ε_θ in plain loops and three GEMMs per step, with the per-timestep gains and the
//! batch norms folded into one scale and shift per layer and timestep.
//!
//! The reference is [`crate::model::FerModel::sample`] (candle ops, the same maths layer by
//! layer); `tests/sampler.rs` checks that both draw the same votes from the same seed and agree
//! on ŷ_0 within a stated tolerance. Noise is drawn exactly as the reference draws it: per face,
//! from that face's generator, `samples × C` standard normals for the prior and then for every
//! step but the last.
//!
//! ε_θ for one row (DESIGN §3, `model/card.rs`), in inference mode:
//! `h1 = softplus(A1_t ⊙ (W1 [y_t, f]) + B1_t) ⊙ emb`, `h2 = softplus(A2_t ⊙ (W2 h1) + B2_t)`,
//! `h3 = softplus(A3_t ⊙ (W3 h2) + B3_t)`, `ε̂ = Wo h3 + bo`, where for a layer with weight W,
//! bias b, timestep gain g_t and batch norm (γ, β, μ, σ²): `s = γ/√(σ² + eps)`, `A_t = s ⊙ g_t`,
//! `B_t = A_t ⊙ b + β − μ ⊙ s`. The image embedding `emb = s_e ⊙ (We x + be) + β_e − μ_e ⊙ s_e`
//! is computed once per face.

use rand::Rng;
use rand_distr::StandardNormal;

use super::dense::Dense;
use super::softplus::scale_shift_softplus;
use crate::model::diffusion::{reverse_pairs, sampling_timesteps, Schedule, StepCoeffs};

/// One time-conditioned layer with its batch norm folded: `A_t ⊙ (W x) + B_t`.
#[derive(Debug, Clone)]
pub struct FoldedLayer {
    /// The weight `W`, `(d_out, d_in)`.
    pub dense: Dense,
    /// `(T, d_out)`: per-timestep scale and shift.
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

impl FoldedLayer {
    /// Folds `W`, `b`, the gains `(T, d_out)` and a batch norm's `(γ, β, μ, σ², eps)`.
    #[allow(clippy::too_many_arguments)]
    pub fn fold(
        weight: Vec<f32>,
        bias: &[f32],
        gains: &[f32],
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f64,
    ) -> Self {
        let d_out = bias.len();
        let d_in = weight.len() / d_out.max(1);
        let t_total = gains.len() / d_out.max(1);
        let mut scale = Vec::with_capacity(gains.len());
        let mut shift = Vec::with_capacity(gains.len());
        for t in 0..t_total {
            for j in 0..d_out {
                let s = gamma[j] as f64 / (var[j] as f64 + eps).sqrt();
                let a = s * gains[t * d_out + j] as f64;
                scale.push(a as f32);
                shift.push((a * bias[j] as f64 + beta[j] as f64 - mean[j] as f64 * s) as f32);
            }
        }
        Self {
            dense: Dense::new(&weight, d_out, d_in),
            scale,
            shift,
        }
    }
}

/// ε_θ's weights, folded for the fused sampler ([`FusedCard::sample`]).
#[derive(Debug, Clone)]
pub struct FusedCard {
    pub classes: usize,
    pub hidden: usize,
    pub feat_dim: usize,
    /// Image embedding: `(hidden, feat_dim)` weight and the folded batch norm (`scale`, `shift`
    /// of one "timestep").
    pub(crate) image: FoldedLayer,
    /// First layer on `[y_t, f]` `(hidden, 2C)`, and its two halves: on y_t and on f.
    pub(crate) lin1: FoldedLayer,
    pub(crate) lin1_y: Dense,
    pub(crate) lin1_f: Dense,
    pub(crate) lin2: FoldedLayer,
    pub(crate) lin3: FoldedLayer,
    /// Output layer `(C, hidden)` and its bias.
    pub(crate) out: Dense,
    pub(crate) out_bias: Vec<f32>,
    pub(crate) schedule: Schedule,
}

impl FusedCard {
    /// Builds the sampler from folded layers (see [`FoldedLayer::fold`]); `out_weight` is the
    /// output layer's row-major `(C, hidden)` weight.
    pub fn new(
        image: FoldedLayer,
        lin1: FoldedLayer,
        lin2: FoldedLayer,
        lin3: FoldedLayer,
        out_weight: &[f32],
        out_bias: Vec<f32>,
        schedule: Schedule,
    ) -> Self {
        let (c, h) = (out_bias.len(), image.dense.d_out);
        let (w_y, w_f) = split_columns(lin1.dense.weight(), h, c);
        Self {
            classes: c,
            hidden: h,
            feat_dim: image.dense.d_in,
            lin1_y: Dense::new(&w_y, h, c),
            lin1_f: Dense::new(&w_f, h, c),
            out: Dense::new(out_weight, c, h),
            image,
            lin1,
            lin2,
            lin3,
            out_bias,
            schedule,
        }
    }

    /// The image embeddings `(b, hidden)` of encoder features `(b, feat_dim)`.
    fn embed(&self, features: &[f32], b: usize) -> Vec<f32> {
        let h = self.hidden;
        let mut emb = vec![0f32; b * h];
        self.image.dense.forward(features, b, &mut emb);
        for row in emb.chunks_exact_mut(h) {
            for ((x, a), s) in row.iter_mut().zip(&self.image.scale).zip(&self.image.shift) {
                *x = *a * *x + *s;
            }
        }
        emb
    }

    /// Draws `samples` ŷ_0 per face in `steps` steps: `features (b, feat_dim)` and f_φ's softmax
    /// `f (b, C)` row-major, one generator per face. Returns `(b, samples, C)` row-major.
    ///
    /// # Panics
    /// If the slice lengths do not match `b = rngs.len()` (a caller bug, not bad input).
    pub fn sample<R: Rng>(
        &self,
        features: &[f32],
        f: &[f32],
        samples: usize,
        steps: usize,
        rngs: &mut [R],
    ) -> Vec<f32> {
        let (b, c, h) = (rngs.len(), self.classes, self.hidden);
        assert_eq!(features.len(), b * self.feat_dim, "features length");
        assert_eq!(f.len(), b * c, "f length");
        let n = b * samples;
        if n == 0 {
            return Vec::new();
        }
        let pairs = self.reverse_steps(steps);
        let noise = draw_noise(rngs, samples, pairs.len(), c);
        let ctx = Chain {
            emb: self.embed(features, b),
            // W1 [y, f] = W1_y y + W1_f f: the f half is the same for every sample and step.
            f_part: {
                let mut v = vec![0f32; b * h];
                self.lin1_f.forward(f, b, &mut v);
                v
            },
            f,
            samples,
            n,
            noise: &noise,
            pairs: &pairs,
        };
        let mut y = vec![0f32; n * c];
        // Rows per thread: at least a few, so one face's 32 samples still split in two.
        let per = n.div_ceil(rayon::current_num_threads().max(1)).max(8);
        if per >= n {
            self.chain(&ctx, 0, &mut y);
        } else {
            use rayon::prelude::*;
            y.par_chunks_mut(per * c)
                .enumerate()
                .for_each(|(i, part)| self.chain(&ctx, i * per, part));
        }
        y
    }

    /// The (timestep, previous timestep) pairs of a `steps`-step chain, in the order they run:
    /// the prior's draw and one per step but the last make `len()` noise draws.
    pub(crate) fn reverse_steps(&self, steps: usize) -> Vec<(usize, Option<usize>)> {
        reverse_pairs(&sampling_timesteps(self.schedule.len(), steps))
    }

    /// Runs the reverse chain of rows `first..first + y.len()/C` into `y`.
    fn chain(&self, ctx: &Chain, first: usize, y: &mut [f32]) {
        let (c, h, s) = (self.classes, self.hidden, ctx.samples);
        let rows = y.len() / c;
        let face = |r: usize| (first + r) / s;
        let frow = |r: usize| &ctx.f[face(r) * c..(face(r) + 1) * c];
        let noise = |d: usize| &ctx.noise[d * ctx.n * c + first * c..][..rows * c];
        // Prior y_T = f + z.
        for (r, (row, z)) in y
            .chunks_exact_mut(c)
            .zip(noise(0).chunks_exact(c))
            .enumerate()
        {
            for ((v, fv), zv) in row.iter_mut().zip(frow(r)).zip(z) {
                *v = fv + zv;
            }
        }
        let mut h1 = vec![0f32; rows * h];
        let mut h2 = vec![0f32; rows * h];
        let mut eps = vec![0f32; rows * c];
        for (k, &(t, prev)) in ctx.pairs.iter().enumerate() {
            let co = step_constants(&self.schedule.step_coeffs(t, prev));
            self.lin1_y.forward(y, rows, &mut h1);
            for (r, row) in h1.chunks_exact_mut(h).enumerate() {
                for (x, u) in row.iter_mut().zip(&ctx.f_part[face(r) * h..][..h]) {
                    *x += u;
                }
            }
            let (a1, b1) = self.lin1.at(t);
            scale_shift_softplus(&mut h1, a1, b1);
            for (r, row) in h1.chunks_exact_mut(h).enumerate() {
                for (x, e) in row.iter_mut().zip(&ctx.emb[face(r) * h..][..h]) {
                    *x *= e;
                }
            }
            self.lin2.dense.forward(&h1, rows, &mut h2);
            let (a2, b2) = self.lin2.at(t);
            scale_shift_softplus(&mut h2, a2, b2);
            self.lin3.dense.forward(&h2, rows, &mut h1);
            let (a3, b3) = self.lin3.at(t);
            scale_shift_softplus(&mut h1, a3, b3);
            self.out.forward(&h1, rows, &mut eps);
            // The last step draws no noise (and uses none).
            let last = co[7] != 0.0;
            let z = if last { &eps[..] } else { noise(k + 1) };
            for (r, row) in y.chunks_exact_mut(c).enumerate() {
                let fr = frow(r);
                for j in 0..c {
                    let e = eps[r * c + j] + self.out_bias[j];
                    row[j] = reverse_update(row[j], fr[j], e, z[r * c + j], &co);
                }
            }
        }
    }
}

/// The noise of every row's chain: per face, from its generator, `samples × C` standard
/// normals for the prior and then for every step but the last, laid out `(draws, n, C)` with
/// `n = faces × samples` rows, each face's samples together. Drawing it all first, in the
/// reference's order for each face, leaves every row's chain independent of the others.
pub(crate) fn draw_noise<R: Rng>(
    rngs: &mut [R],
    samples: usize,
    draws: usize,
    c: usize,
) -> Vec<f32> {
    let n = rngs.len() * samples;
    let mut noise = vec![0f32; draws * n * c];
    for (face, rng) in rngs.iter_mut().enumerate() {
        for d in 0..draws {
            let at = d * n * c + face * samples * c;
            for v in &mut noise[at..at + samples * c] {
                *v = rng.sample::<f32, _>(StandardNormal);
            }
        }
    }
    noise
}

/// What every row's chain reads: per-face image embeddings and f-halves of layer 1, f_φ, and
/// the pre-drawn noise (`draws × n × C`).
struct Chain<'a> {
    emb: Vec<f32>,
    f_part: Vec<f32>,
    f: &'a [f32],
    samples: usize,
    n: usize,
    noise: &'a [f32],
    pairs: &'a [(usize, Option<usize>)],
}

/// The first `c` and the last `c` columns of a row-major `(rows, 2c)` matrix, as two matrices.
fn split_columns(w: &[f32], rows: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut left, mut right) = (Vec::with_capacity(rows * c), Vec::with_capacity(rows * c));
    for row in w.chunks_exact(2 * c) {
        left.extend_from_slice(&row[..c]);
        right.extend_from_slice(&row[c..]);
    }
    (left, right)
}

/// The f32 constants of one reverse step as [`reverse_update`] uses them (the GPU chain's
/// `coef` rows): `√ᾱ, 1 − √ᾱ, √(1 − ᾱ), γ0, γ1, γ2, √variance, last` (1 on the last step).
pub(crate) fn step_constants(co: &StepCoeffs) -> [f32; 8] {
    [
        co.sqrt_alpha_bar as f32,
        (1.0 - co.sqrt_alpha_bar) as f32,
        co.sqrt_one_minus_alpha_bar as f32,
        co.gamma0 as f32,
        co.gamma1 as f32,
        co.gamma2 as f32,
        co.variance.sqrt() as f32,
        if co.last { 1.0 } else { 0.0 },
    ]
}

/// One element of [`crate::model::diffusion::reverse_step`]: ŷ_0 on the last step, otherwise
/// `γ0·ŷ_0 + γ1·y_t + γ2·f + √variance·z`.
/// `co` is [`step_constants`] of the step, computed once per step.
fn reverse_update(y: f32, f: f32, eps: f32, z: f32, co: &[f32; 8]) -> f32 {
    let [sab, one_minus_sab, somab, g0, g1, g2, sd, last] = *co;
    let y0 = (y - f * one_minus_sab - eps * somab) / sab;
    if last != 0.0 {
        return y0;
    }
    g0 * y0 + g1 * y + g2 * f + sd * z
}

impl FoldedLayer {
    /// Scale and shift at timestep `t`.
    pub(crate) fn at(&self, t: usize) -> (&[f32], &[f32]) {
        let d = self.dense.d_out;
        (
            &self.scale[t * d..(t + 1) * d],
            &self.shift[t * d..(t + 1) * d],
        )
    }
}
