//! One CARD training batch (Han et al. 2022, Algorithm 1 for classification): one-hot labels
//! (or vote distributions) y_0, a timestep t per row, noise ε, and the forward draw
//! `y_t = √ᾱ_t·y_0 + (1 − √ᾱ_t)·f_φ(x) + √(1 − ᾱ_t)·ε`; ε_θ is trained to predict ε from y_t.

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::model::diffusion::{q_sample, Schedule};

/// The targets of one batch.
#[derive(Debug)]
pub struct CardBatch {
    /// Label vectors `(b, C)`.
    pub y0: Tensor,
    /// The noised labels `(b, C)` ε_θ sees.
    pub y_t: Tensor,
    /// Timesteps `(b,)`, u32.
    pub t: Tensor,
    /// The noise `(b, C)` ε_θ must predict.
    pub eps: Tensor,
}

impl CardBatch {
    /// Draws a batch for the label vectors `y0` (`b · C` flat: one-hot labels, or vote
    /// distributions) with f_φ's probabilities `f` `(b, C)`. From `rng`, in this order: b
    /// timesteps, then b·C standard normals (the order that makes a resumed run bit-exact).
    pub fn draw<R: Rng>(
        y0: Vec<f32>,
        f: &Tensor,
        schedule: &Schedule,
        rng: &mut R,
        dev: &Device,
    ) -> Result<Self> {
        let (b, classes) = f.dims2()?;
        if y0.len() != b * classes {
            candle_core::bail!("{} label values for {b} rows of {classes}", y0.len());
        }
        let y0 = Tensor::from_vec(y0, (b, classes), dev)?;
        let ts: Vec<u32> = (0..b)
            .map(|_| rng.random_range(0..schedule.len() as u32))
            .collect();
        let coeffs: Vec<_> = ts
            .iter()
            .map(|&t| schedule.forward_coeffs(t as usize))
            .collect();
        let eps: Vec<f32> = (0..b * classes)
            .map(|_| rng.sample(StandardNormal))
            .collect();
        let eps = Tensor::from_vec(eps, (b, classes), dev)?;
        let y_t = q_sample(&y0, f, &eps, &coeffs)?;
        Ok(Self {
            y0,
            y_t,
            t: Tensor::from_vec(ts, b, dev)?,
            eps,
        })
    }

    /// The training loss: mean squared error between ε_θ's prediction and the true noise.
    pub fn loss(&self, eps_hat: &Tensor) -> Result<Tensor> {
        (eps_hat - &self.eps)?.sqr()?.mean_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::diffusion::predict_y0;
    use crate::train::targets::smoothed_targets;
    use rand::SeedableRng;

    fn onehot(labels: &[u32]) -> Vec<f32> {
        smoothed_targets(labels, 3, 0.0)
    }

    #[test]
    fn targets_follow_the_forward_process_and_invert_with_the_true_noise() -> Result<()> {
        let dev = Device::Cpu;
        let s = Schedule::linear(10, 0.01, 0.95);
        let f = Tensor::new(
            &[[0.2f32, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]],
            &dev,
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let batch = CardBatch::draw(onehot(&[1, 0, 2]), &f, &s, &mut rng, &dev)?;
        let y0 = batch.y0.to_vec2::<f32>()?;
        assert_eq!(
            y0,
            vec![vec![0., 1., 0.], vec![1., 0., 0.], vec![0., 0., 1.]]
        );
        let ts = batch.t.to_vec1::<u32>()?;
        let (y_t, eps, fv) = (
            batch.y_t.to_vec2::<f32>()?,
            batch.eps.to_vec2::<f32>()?,
            f.to_vec2::<f32>()?,
        );
        for r in 0..3 {
            // y_t = √ᾱ·y0 + (1 − √ᾱ)·f + √(1 − ᾱ)·ε, from ᾱ_t directly.
            let ab = s.alpha_bar(ts[r] as usize);
            for k in 0..3 {
                let want = ab.sqrt() * y0[r][k] as f64
                    + (1.0 - ab.sqrt()) * fv[r][k] as f64
                    + (1.0 - ab).sqrt() * eps[r][k] as f64;
                assert!((y_t[r][k] as f64 - want).abs() < 1e-5, "row {r} class {k}");
            }
            // The sampler's ŷ_0 formula, given the true noise, gives the label back.
            let row = |t: &Tensor| t.narrow(0, r, 1);
            let back = predict_y0(
                &row(&batch.y_t)?,
                &row(&f)?,
                &row(&batch.eps)?,
                &s.step_coeffs(ts[r] as usize, ts[r].checked_sub(1).map(|p| p as usize)),
            )?
            .to_vec2::<f32>()?;
            for k in 0..3 {
                assert!((back[0][k] - y0[r][k]).abs() < 1e-3, "row {r}: {back:?}");
            }
        }
        // An ε_θ that returns the true noise has zero loss; one that returns zeros has E[ε²].
        assert_eq!(batch.loss(&batch.eps)?.to_scalar::<f32>()?, 0.0);
        let zero = batch.loss(&batch.eps.zeros_like()?)?.to_scalar::<f32>()?;
        let mean_sq = eps.iter().flatten().map(|e| e * e).sum::<f32>() / 9.0;
        assert!((zero - mean_sq).abs() < 1e-6);
        // The same generator state draws the same batch.
        let mut rng2 = rand::rngs::StdRng::seed_from_u64(7);
        let again = CardBatch::draw(onehot(&[1, 0, 2]), &f, &s, &mut rng2, &dev)?;
        assert_eq!(again.y_t.to_vec2::<f32>()?, y_t);
        assert!(CardBatch::draw(onehot(&[1, 0]), &f, &s, &mut rng2, &dev).is_err());
        Ok(())
    }
}
