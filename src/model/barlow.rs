//! Barlow Twins (Zbontar et al., ICML 2021, §2, eq. 1–2): a projector on encoder features and the
//! redundancy-reduction loss on the cross-correlation of two views' batch-normalised embeddings.

use candle_core::{Module, ModuleT, Result, Tensor, D};
use candle_nn::{batch_norm, linear, linear_no_bias, BatchNorm, Linear, VarBuilder};

/// λ of the reference implementation.
pub const DEFAULT_LAMBDA: f64 = 0.0051;

/// Projector: (Linear-BN-ReLU) for every hidden width, then a final Linear.
#[derive(Debug, Clone)]
pub struct Projector {
    hidden: Vec<(Linear, BatchNorm)>,
    last: Linear,
}

impl Projector {
    /// `dims` = widths after the input, e.g. `[2048, 2048, 2048]` (the last one is the embedding).
    pub fn new(in_dim: usize, dims: &[usize], vb: VarBuilder) -> Result<Self> {
        let Some((&out_dim, hidden_dims)) = dims.split_last() else {
            candle_core::bail!("projector needs at least one layer width")
        };
        let mut hidden = Vec::new();
        let mut d = in_dim;
        for (i, &h) in hidden_dims.iter().enumerate() {
            let lin = linear_no_bias(d, h, vb.pp(format!("l{i}")))?;
            let bn = batch_norm(h, 1e-5, vb.pp(format!("bn{i}")))?;
            hidden.push((lin, bn));
            d = h;
        }
        let last = linear(d, out_dim, vb.pp(format!("l{}", hidden_dims.len())))?;
        Ok(Self { hidden, last })
    }
}

impl ModuleT for Projector {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (lin, bn) in &self.hidden {
            xs = bn.forward_t(&lin.forward(&xs)?, train)?.relu()?;
        }
        self.last.forward(&xs)
    }
}

/// Standardises each column over the batch (mean 0, variance 1, biased estimate as in the
/// reference's affine-free BatchNorm1d).
fn standardize(zs: &Tensor) -> Result<Tensor> {
    let mean = zs.mean_keepdim(0)?;
    let centred = zs.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(0)?;
    centred.broadcast_div(&(var + 1e-5)?.sqrt()?)
}

/// The Barlow Twins loss for embeddings `z_a`, `z_b` of shape `(n, d)`:
/// `Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²` with `C = z̃_aᵀ z̃_b / n`.
pub fn barlow_twins_loss(z_a: &Tensor, z_b: &Tensor, lambda: f64) -> Result<Tensor> {
    let n = z_a.dim(0)?;
    let d = z_a.dim(1)?;
    let c = (standardize(z_a)?.t()?.matmul(&standardize(z_b)?)? / n as f64)?;
    let eye = Tensor::eye(d, c.dtype(), c.device())?;
    let diag = (&c * &eye)?.sum(D::Minus1)?;
    let on_diag = (diag - 1.0)?.sqr()?.sum_all()?;
    let off_diag = ((&c * (1.0 - &eye)?)?.sqr()?.sum_all()? * lambda)?;
    on_diag + off_diag
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn identical_decorrelated_views_have_zero_loss() -> Result<()> {
        // Columns ±1 with orthogonal sign patterns: standardised, C = I exactly (up to eps).
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 1.], [1., -1.], [-1., 1.], [-1., -1.]], &dev)?;
        let loss = barlow_twins_loss(&z, &z, DEFAULT_LAMBDA)?.to_scalar::<f32>()?;
        assert!(loss.abs() < 1e-3, "{loss}");
        Ok(())
    }

    #[test]
    fn loss_matches_hand_value_for_correlated_columns() -> Result<()> {
        // Both columns equal: C = [[1,1],[1,1]], loss = 0 + λ·2.
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 1.], [-1., -1.], [1., 1.], [-1., -1.]], &dev)?;
        let loss = barlow_twins_loss(&z, &z, 0.5)?.to_scalar::<f32>()?;
        assert!((loss - 1.0).abs() < 1e-3, "{loss}");
        // Anti-correlated views: C_ii = −1, on-diagonal term 2·4 = 8.
        let z2 = Tensor::new(&[[1f32, 1.], [-1., 1.], [1., -1.], [-1., -1.]], &dev)?;
        let loss = barlow_twins_loss(&z2, &z2.neg()?, 0.0)?.to_scalar::<f32>()?;
        assert!((loss - 8.0).abs() < 1e-2, "{loss}");
        Ok(())
    }

    #[test]
    fn projector_shapes() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let p = Projector::new(512, &[64, 64, 32], vb)?;
        let xs = Tensor::randn(0f32, 1., (8, 512), &Device::Cpu)?;
        assert_eq!(p.forward_t(&xs, true)?.dims(), &[8, 32]);
        Ok(())
    }
}
