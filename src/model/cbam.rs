//! CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, §3, eqs. 2–3).
//!
//! Channel attention `M_c = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))` with a shared MLP C→C/r→C, then
//! spatial attention `M_s = σ(conv7x7([mean_c(F'); max_c(F')]))`, applied in that order.

use candle_core::{Module, ModuleT, Result, Tensor, D};
use candle_nn::{
    batch_norm, conv2d_no_bias, linear, BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder,
};

/// CBAM gate for a `(b, c, h, w)` feature map; output has the same shape.
#[derive(Debug, Clone)]
pub struct Cbam {
    fc1: Linear,
    fc2: Linear,
    spatial: Conv2d,
    spatial_bn: BatchNorm,
}

impl Cbam {
    /// `channels` of the feature map, MLP reduction `reduction` (hidden width at least 1).
    pub fn new(channels: usize, reduction: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = (channels / reduction.max(1)).max(1);
        let cfg = Conv2dConfig {
            padding: 3,
            ..Default::default()
        };
        Ok(Self {
            fc1: linear(channels, hidden, vb.pp("channel.fc1"))?,
            fc2: linear(hidden, channels, vb.pp("channel.fc2"))?,
            spatial: conv2d_no_bias(2, 1, 7, cfg, vb.pp("spatial.conv"))?,
            spatial_bn: batch_norm(1, 1e-5, vb.pp("spatial.bn"))?,
        })
    }

    fn mlp(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.relu()?)
    }
}

impl ModuleT for Cbam {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, _h, _w) = xs.dims4()?;
        let flat = xs.flatten_from(2)?;
        let avg = flat.mean(D::Minus1)?;
        let max = flat.max(D::Minus1)?;
        let gate = candle_nn::ops::sigmoid(&(self.mlp(&avg)? + self.mlp(&max)?)?)?;
        let xs = xs.broadcast_mul(&gate.reshape((b, c, 1, 1))?)?;
        let pooled = Tensor::cat(&[xs.mean_keepdim(1)?, xs.max_keepdim(1)?], 1)?;
        let att = self
            .spatial_bn
            .forward_t(&self.spatial.forward(&pooled)?, train)?;
        xs.broadcast_mul(&candle_nn::ops::sigmoid(&att)?)
    }
}
