//! CARD diffusion maths for classification (Han et al., "CARD: Classification and Regression
//! Diffusion Models", NeurIPS 2022, §2 and Appendix A).
//!
//! The forward process is shifted towards the prior mean `f = f_phi(x)`:
//!
//! `y_t = √ᾱ_t·y_0 + (1−√ᾱ_t)·f + √(1−ᾱ_t)·ε`   (CARD eq. 2), and the prior is `y_T ~ N(f, I)`.
//!
//! In the centred variable `z = y − f` this is an ordinary DDPM chain, which is why a model trained
//! on all `T` steps can be sampled on any increasing subset of them: for a pair of kept timesteps
//! `s < t` we use `α_{t|s} = ᾱ_t/ᾱ_s` and `β_{t|s} = 1 − α_{t|s}` in place of `α_t`, `β_t`. With the
//! full chain (`s = t − 1`) the coefficients are exactly CARD's γ0, γ1, γ2 (eq. 8).
//!
//! Timesteps are 0-based indices `0..T`; index `t` has `ᾱ_t = Π_{i≤t} (1 − β_i)`, and the
//! "previous" ᾱ of index 0 is 1. Scalar coefficients are pure functions; the tensor functions only
//! apply them.

use candle_core::{Result, Tensor};

/// A variance schedule β_0..β_{T−1} with its cumulative products.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    betas: Vec<f64>,
    alpha_bars: Vec<f64>,
}

impl Schedule {
    /// Linear β from `beta_start` to `beta_end` over `t` steps (CARD: T=1000, 1e-4…0.02 on CIFAR;
    /// T=10, 0.01…0.95 for its ImageNet head on frozen features). Needs `t ≥ 1` and
    /// `0 < beta_start ≤ beta_end < 1` (checked by the model config).
    pub fn linear(t: usize, beta_start: f64, beta_end: f64) -> Self {
        let betas: Vec<f64> = if t == 1 {
            vec![beta_start]
        } else {
            (0..t)
                .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (t - 1) as f64)
                .collect()
        };
        Self::from_betas(betas)
    }

    /// A schedule from explicit betas.
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let mut acc = 1.0;
        let alpha_bars = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self { betas, alpha_bars }
    }

    /// Number of timesteps T.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Whether the schedule has no steps.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// β_t.
    pub fn beta(&self, t: usize) -> f64 {
        self.betas[t]
    }

    /// ᾱ_t.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alpha_bars[t]
    }

    /// Coefficients `(a, b, c)` of the forward draw `y_t = a·y_0 + b·f + c·ε`.
    pub fn forward_coeffs(&self, t: usize) -> (f64, f64, f64) {
        let ab = self.alpha_bars[t];
        (ab.sqrt(), 1.0 - ab.sqrt(), (1.0 - ab).sqrt())
    }

    /// Coefficients of one reverse step from `t` to `prev` (`None`: the chain ends and returns ŷ_0).
    pub fn step_coeffs(&self, t: usize, prev: Option<usize>) -> StepCoeffs {
        let ab_t = self.alpha_bars[t];
        let ab_s = prev.map_or(1.0, |s| self.alpha_bars[s]);
        let alpha_ts = ab_t / ab_s;
        let beta_ts = 1.0 - alpha_ts;
        let gamma0 = beta_ts * ab_s.sqrt() / (1.0 - ab_t);
        let gamma1 = (1.0 - ab_s) * alpha_ts.sqrt() / (1.0 - ab_t);
        StepCoeffs {
            sqrt_alpha_bar: ab_t.sqrt(),
            sqrt_one_minus_alpha_bar: (1.0 - ab_t).sqrt(),
            gamma0,
            gamma1,
            // 1 − γ0 − γ1: the f-weight that keeps the centred chain centred. Equal to CARD's
            // closed form 1 + (√ᾱ_t − 1)(√α_t + √ᾱ_{t−1})/(1 − ᾱ_t) (checked in the tests).
            gamma2: 1.0 - gamma0 - gamma1,
            variance: beta_ts * (1.0 - ab_s) / (1.0 - ab_t),
            last: prev.is_none(),
        }
    }
}

/// Scalars of one reverse step `t → s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoeffs {
    pub sqrt_alpha_bar: f64,
    pub sqrt_one_minus_alpha_bar: f64,
    pub gamma0: f64,
    pub gamma1: f64,
    pub gamma2: f64,
    pub variance: f64,
    /// The final step: return ŷ_0 instead of drawing y_{t−1}.
    pub last: bool,
}

/// The descending sampling timesteps when a `T`-step model is sampled in `steps` steps: evenly
/// spaced from `T−1` down to 0, both ends included (for `steps ≥ 2`). `steps` is clamped to 1..=T.
pub fn sampling_timesteps(t_total: usize, steps: usize) -> Vec<usize> {
    let steps = steps.clamp(1, t_total.max(1));
    if steps == 1 {
        return vec![t_total.saturating_sub(1)];
    }
    let mut ts: Vec<usize> = (0..steps)
        .map(|k| ((k as f64) * (t_total - 1) as f64 / (steps - 1) as f64).round() as usize)
        .collect();
    ts.dedup();
    ts.reverse();
    ts
}

/// Pairs `(t, prev)` of the reverse chain for the given descending timesteps.
pub fn reverse_pairs(ts: &[usize]) -> Vec<(usize, Option<usize>)> {
    ts.iter()
        .enumerate()
        .map(|(i, &t)| (t, ts.get(i + 1).copied()))
        .collect()
}

/// Forward draw (CARD eq. 2) with per-row coefficients: `y0`, `f`, `eps` are `(n, C)`, `coeffs`
/// holds `(a, b, c)` of [`Schedule::forward_coeffs`] per row.
pub fn q_sample(
    y0: &Tensor,
    f: &Tensor,
    eps: &Tensor,
    coeffs: &[(f64, f64, f64)],
) -> Result<Tensor> {
    let n = y0.dim(0)?;
    let col = |sel: fn(&(f64, f64, f64)) -> f64| -> Result<Tensor> {
        let v: Vec<f32> = coeffs.iter().map(|c| sel(c) as f32).collect();
        Tensor::from_vec(v, (n, 1), y0.device())
    };
    let a = col(|c| c.0)?;
    let b = col(|c| c.1)?;
    let c = col(|c| c.2)?;
    y0.broadcast_mul(&a)? + f.broadcast_mul(&b)? + eps.broadcast_mul(&c)?
}

/// ŷ_0 from y_t and the predicted noise: `(y_t − (1−√ᾱ_t)·f − √(1−ᾱ_t)·ε̂)/√ᾱ_t`.
pub fn predict_y0(y_t: &Tensor, f: &Tensor, eps_hat: &Tensor, c: &StepCoeffs) -> Result<Tensor> {
    let shifted = (y_t - (f * (1.0 - c.sqrt_alpha_bar))?)?;
    (shifted - (eps_hat * c.sqrt_one_minus_alpha_bar)?)? / c.sqrt_alpha_bar
}

/// One reverse step. Returns ŷ_0 on the last step, otherwise
/// `γ0·ŷ_0 + γ1·y_t + γ2·f + √variance·z` with `z ~ N(0, I)` supplied by the caller.
pub fn reverse_step(
    y_t: &Tensor,
    f: &Tensor,
    eps_hat: &Tensor,
    z: &Tensor,
    c: &StepCoeffs,
) -> Result<Tensor> {
    let y0_hat = predict_y0(y_t, f, eps_hat, c)?;
    if c.last {
        return Ok(y0_hat);
    }
    let mean = ((y0_hat * c.gamma0)? + (y_t * c.gamma1)? + (f * c.gamma2)?)?;
    mean + (z * c.variance.sqrt())?
}

/// The few-step reverse chain (CARD's sampler) on the strided `steps` of `schedule`: starts from
/// the prior `y_T = f + noise()`, asks `eps(y_t, t)` for the predicted noise at each step, and
/// returns ŷ_0 of the last one. `noise()` draws `z ~ N(0, I)` shaped like `f`. The network is a
/// parameter so that the loop is tested with an oracle and shared by every caller.
pub fn reverse_chain(
    schedule: &Schedule,
    f: &Tensor,
    steps: usize,
    mut noise: impl FnMut() -> Result<Tensor>,
    mut eps: impl FnMut(&Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut y = (f + noise()?)?;
    for (t, prev) in reverse_pairs(&sampling_timesteps(schedule.len(), steps)) {
        let coeffs = schedule.step_coeffs(t, prev);
        let eps_hat = eps(&y, t)?;
        let z = if coeffs.last {
            y.zeros_like()?
        } else {
            noise()?
        };
        y = reverse_step(&y, f, &eps_hat, &z, &coeffs)?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn linear_schedule_and_alpha_bar_match_hand_values() {
        let s = Schedule::linear(3, 0.1, 0.3);
        assert!(close(s.beta(1), 0.2, 1e-12));
        assert!(close(s.alpha_bar(0), 0.9, 1e-12));
        assert!(close(s.alpha_bar(1), 0.9 * 0.8, 1e-12));
        assert!(close(s.alpha_bar(2), 0.9 * 0.8 * 0.7, 1e-12));
        let s10 = Schedule::linear(10, 0.01, 0.95);
        assert_eq!(s10.len(), 10);
        assert!(close(s10.beta(9), 0.95, 1e-12));
        // Monotone decreasing towards ~0 for CARD's few-step schedule.
        for t in 1..10 {
            assert!(s10.alpha_bar(t) < s10.alpha_bar(t - 1));
        }
        assert!(s10.alpha_bar(9) < 1e-3);
    }

    #[test]
    fn gammas_match_hand_computed_values_and_card_closed_form() {
        // betas 0.1, 0.2, 0.3; step t=2 -> 1: ᾱ_2 = 0.504, ᾱ_1 = 0.72, α_2 = 0.7, β_2 = 0.3.
        let s = Schedule::linear(3, 0.1, 0.3);
        let c = s.step_coeffs(2, Some(1));
        let g0 = 0.3 * 0.72f64.sqrt() / (1.0 - 0.504);
        let g1 = (1.0 - 0.72) * 0.7f64.sqrt() / (1.0 - 0.504);
        let g2 = 1.0 + (0.504f64.sqrt() - 1.0) * (0.7f64.sqrt() + 0.72f64.sqrt()) / (1.0 - 0.504);
        let var = 0.3 * (1.0 - 0.72) / (1.0 - 0.504);
        assert!(close(c.gamma0, g0, 1e-12), "{} {}", c.gamma0, g0);
        assert!(close(c.gamma1, g1, 1e-12));
        assert!(close(c.gamma2, g2, 1e-12), "{} {}", c.gamma2, g2);
        assert!(close(c.variance, var, 1e-12));
        // Literal numbers, so a shared mistake in both forms above would still be caught.
        assert!(close(c.gamma0, 0.51322, 1e-4), "{}", c.gamma0);
        assert!(close(c.gamma1, 0.47231, 1e-4), "{}", c.gamma1);
        assert!(close(c.variance, 0.16935, 1e-4), "{}", c.variance);
        // The closed form holds on every step of a longer schedule too.
        let s = Schedule::linear(1000, 1e-4, 0.02);
        for t in [1usize, 10, 500, 999] {
            let c = s.step_coeffs(t, Some(t - 1));
            let (ab, abp, a) = (s.alpha_bar(t), s.alpha_bar(t - 1), 1.0 - s.beta(t));
            let g2 = 1.0 + (ab.sqrt() - 1.0) * (a.sqrt() + abp.sqrt()) / (1.0 - ab);
            assert!(close(c.gamma2, g2, 1e-9), "t={t}");
        }
    }

    #[test]
    fn strided_timesteps_cover_both_ends() {
        assert_eq!(
            sampling_timesteps(10, 10),
            (0..10).rev().collect::<Vec<_>>()
        );
        assert_eq!(sampling_timesteps(10, 4), vec![9, 6, 3, 0]);
        assert_eq!(sampling_timesteps(1000, 2), vec![999, 0]);
        assert_eq!(sampling_timesteps(10, 1), vec![9]);
        assert_eq!(sampling_timesteps(10, 50), sampling_timesteps(10, 10));
        assert_eq!(
            reverse_pairs(&[9, 6, 3, 0]),
            vec![(9, Some(6)), (6, Some(3)), (3, Some(0)), (0, None)]
        );
    }

    /// An ε network that knows y_0 makes every reverse step's ŷ_0 exact, whatever noise the
    /// steps draw, so the loop must end on y_0 (the chain's arithmetic against independent
    /// numbers is in tests/diffusion.rs).
    #[test]
    fn sampler_loop_with_an_oracle_network_returns_y0() -> Result<()> {
        // An ε network that knows y_0 returns the noise linking y_t to it; whatever the random
        // draws, every step count must then end exactly at y_0. A wrong coefficient, timestep
        // order or last-step rule in the loop breaks this.
        let dev = Device::Cpu;
        let s = Schedule::linear(10, 0.01, 0.95);
        let y0 = Tensor::new(&[[0f32, 1., 0.], [1., 0., 0.]], &dev)?;
        let f = Tensor::new(&[[0.2f32, 0.5, 0.3], [0.6, 0.3, 0.1]], &dev)?;
        for steps in [10usize, 5, 2, 1] {
            let mut k = 0u32;
            let noise = || {
                k += 1;
                let v: Vec<f32> = (0..6)
                    .map(|i| ((i * 7 + k * 3) % 11) as f32 / 5.0 - 1.0)
                    .collect();
                Tensor::from_vec(v, (2, 3), &dev)
            };
            let mut seen = Vec::new();
            let oracle = |y: &Tensor, t: usize| {
                seen.push(t);
                let (a, b, c) = s.forward_coeffs(t);
                (y - (&y0 * a)? - (&f * b)?)? / c
            };
            let out = reverse_chain(&s, &f, steps, noise, oracle)?;
            let err = (out - &y0)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "steps={steps}: max error {err}");
            assert_eq!(seen, sampling_timesteps(10, steps), "steps={steps}");
        }
        // A network that is wrong (zero noise) does not land on y_0: the test has teeth.
        let out = reverse_chain(&s, &f, 10, || f.zeros_like(), |y, _| y.zeros_like())?;
        assert!((out - &y0)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.05);
        Ok(())
    }

    #[test]
    fn reverse_chain_with_true_noise_recovers_y0() -> Result<()> {
        let dev = Device::Cpu;
        let s = Schedule::linear(10, 0.01, 0.95);
        let y0 = Tensor::new(&[[0f32, 1., 0.], [1., 0., 0.]], &dev)?;
        let f = Tensor::new(&[[0.2f32, 0.5, 0.3], [0.6, 0.3, 0.1]], &dev)?;
        for steps in [10usize, 4, 1] {
            let ts = sampling_timesteps(10, steps);
            let eps = Tensor::new(&[[0.3f32, -1.2, 0.7], [-0.4, 0.9, 2.0]], &dev)?;
            let (a, b, c) = s.forward_coeffs(ts[0]);
            let mut y = q_sample(&y0, &f, &eps, &[(a, b, c), (a, b, c)])?;
            for (t, prev) in reverse_pairs(&ts) {
                let coeffs = s.step_coeffs(t, prev);
                // The noise that links the current y_t to y_0 under the forward marginal.
                let (a, b, c) = s.forward_coeffs(t);
                let true_eps = ((&y - (&y0 * a)? - (&f * b)?)? / c)?;
                let zero = y.zeros_like()?;
                y = reverse_step(&y, &f, &true_eps, &zero, &coeffs)?;
            }
            let err = (y - &y0)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "steps={steps}: max error {err}");
        }
        Ok(())
    }

    #[test]
    fn prior_mean_is_f_phi() -> Result<()> {
        // At the last timestep of CARD's schedule ᾱ_T ≈ 0, so y_T ≈ f + ε: the prior is centred on f.
        let dev = Device::Cpu;
        let s = Schedule::linear(10, 0.01, 0.95);
        let (a, b, c) = s.forward_coeffs(9);
        assert!(a < 0.03 && b > 0.97 && c > 0.999, "{a} {b} {c}");
        // A posterior step with y_0 = f and zero noise stays at f.
        let f = Tensor::new(&[[0.1f32, 0.7, 0.2]], &dev)?;
        let co = s.step_coeffs(5, Some(4));
        let zero = f.zeros_like()?;
        let y = reverse_step(&f, &f, &zero, &zero, &co)?;
        let err = (y - &f)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6);
        Ok(())
    }

    #[test]
    fn q_sample_uses_per_row_coefficients() -> Result<()> {
        let dev = Device::Cpu;
        let y0 = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
        let f = Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5]], &dev)?;
        let eps = Tensor::new(&[[1f32, 1.], [1., 1.]], &dev)?;
        let y = q_sample(&y0, &f, &eps, &[(1.0, 0.0, 0.0), (0.0, 1.0, 2.0)])?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![1., 0.], vec![2.5, 2.5]]);
        Ok(())
    }
}
