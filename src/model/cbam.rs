//! CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, §3, eqs. 2–3).
//!
//! Channel attention `M_c = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))` with a shared MLP C→C/r→C, then
//! spatial attention `M_s = σ(BN(conv7x7([mean_c(F'); max_c(F')])))`, applied in that order.

use std::sync::{Arc, RwLock};

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use super::conv_bn::ConvBn;
use crate::kernels::{self, cbam::CbamParams, ConvKernels};

/// CBAM gate for a `(b, c, h, w)` feature map; output has the same shape.
#[derive(Debug, Clone)]
pub struct Cbam {
    fc1: Linear,
    fc2: Linear,
    spatial: ConvBn,
    kernels: ConvKernels,
    packed: Arc<RwLock<Option<Arc<CbamParams>>>>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.detach().flatten_all()?.to_vec1::<f32>()
}

impl Cbam {
    /// `channels` of the feature map, MLP reduction `reduction` (hidden width at least 1).
    pub fn new(
        channels: usize,
        reduction: usize,
        kernels: ConvKernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hidden = (channels / reduction.max(1)).max(1);
        Ok(Self {
            fc1: linear(channels, hidden, vb.pp("channel.fc1"))?,
            fc2: linear(hidden, channels, vb.pp("channel.fc2"))?,
            spatial: ConvBn::new(2, 1, 7, 1, 3, kernels, vb.pp("spatial"))?,
            kernels,
            packed: Arc::new(RwLock::new(None)),
        })
    }

    /// The gate's weights packed for the fused inference kernel (built once, dropped by any
    /// training-mode forward).
    fn packed(&self) -> Result<Arc<CbamParams>> {
        if let Ok(guard) = self.packed.read() {
            if let Some(p) = guard.as_ref() {
                return Ok(p.clone());
            }
        }
        let (sw, sb, _) = self.spatial.folded()?;
        let fc1_b = self.fc1.bias().map(to_vec).transpose()?;
        let fc2_b = self.fc2.bias().map(to_vec).transpose()?;
        let (hidden, channels) = self.fc1.weight().dims2()?;
        let p = Arc::new(CbamParams {
            channels,
            hidden,
            fc1_w: to_vec(self.fc1.weight())?,
            fc1_b: fc1_b.unwrap_or_else(|| vec![0.0; hidden]),
            fc2_wt: to_vec(&self.fc2.weight().t()?.contiguous()?)?,
            fc2_b: fc2_b.unwrap_or_else(|| vec![0.0; channels]),
            spatial_w: to_vec(&sw)?,
            spatial_b: to_vec(&sb)?.first().copied().unwrap_or(0.0),
            spatial_k: sw.dim(3)?,
        });
        if let Ok(mut guard) = self.packed.write() {
            *guard = Some(p.clone());
        }
        Ok(p)
    }

    /// `relu(CBAM(x) + identity)`: the end of a residual block. Fused into one pass over the
    /// feature map in inference on CPU.
    pub fn forward_residual_relu(
        &self,
        xs: &Tensor,
        identity: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let reference = || (self.forward_t(xs, train)? + identity)?.relu();
        if train {
            if let Ok(mut guard) = self.packed.write() {
                *guard = None;
            }
            let gate = |xs: &Tensor| self.channel_gate(xs);
            let spatial = |pooled: &Tensor| self.spatial.forward_t(pooled, true);
            kernels::cbam_train_residual_relu(xs, identity, gate, spatial, self.kernels, reference)
        } else {
            let params = || self.packed();
            kernels::cbam_residual_relu(xs, identity, params, self.kernels, reference)
        }
    }

    fn mlp(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.relu()?)
    }

    /// Channel attention `σ(MLP(AvgPool(x)) + MLP(MaxPool(x)))`, `(b, c)`.
    fn channel_gate(&self, xs: &Tensor) -> Result<Tensor> {
        let (avg, max) = kernels::channel_pool(xs, self.kernels)?;
        candle_nn::ops::sigmoid(&(self.mlp(&avg)? + self.mlp(&max)?)?)
    }
}

impl ModuleT for Cbam {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, _h, _w) = xs.dims4()?;
        let gate = self.channel_gate(xs)?;
        let xs = xs.broadcast_mul(&gate.reshape((b, c, 1, 1))?)?;
        let pooled = Tensor::cat(&[xs.mean_keepdim(1)?, xs.max_keepdim(1)?], 1)?;
        let att = self.spatial.forward_t(&pooled, train)?;
        xs.broadcast_mul(&candle_nn::ops::sigmoid(&att)?)
    }
}
