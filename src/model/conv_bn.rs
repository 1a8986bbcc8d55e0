//! `ConvBn`: the conv + batch-norm unit that the encoder's layers and CBAM's spatial gate share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::{batch_norm, BatchNorm, VarBuilder};

use crate::kernels::{self, conv::PackedCache, ConvKernels, WeightFormat};

/// Conv (no bias) followed by batch-norm: the unit every layer of the encoder is made of.
///
/// In training it runs conv → BN (batch statistics). In inference with the fast kernels the BN
/// is folded into the conv weights and bias once, and conv + bias + ReLU run as one op; any
/// training-mode forward drops the folded copy so it is rebuilt from the updated weights.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    stride: usize,
    pad: usize,
    kernels: ConvKernels,
    folded: Arc<RwLock<Option<Folded>>>,
    /// Whether the folded weights are packed as [`WeightFormat::F16`] (shared by clones, as
    /// the folded copy is).
    half: Arc<AtomicBool>,
}

/// BN-folded inference weights and bias, with the weights also packed for the direct kernel.
type Folded = (Tensor, Tensor, Option<Arc<PackedCache>>);

impl ConvBn {
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        kernels: ConvKernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.pp("conv").get_with_hints(
            (c_out, c_in, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Self {
            weight,
            bn: batch_norm(c_out, 1e-5, vb.pp("bn"))?,
            stride,
            pad: padding,
            kernels,
            folded: Arc::new(RwLock::new(None)),
            half: Arc::new(AtomicBool::new(false)),
        })
    }

    /// BN folded into the conv: `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`, with a cache for the
    /// kernels' packed forms of `w'`.
    pub(crate) fn folded(&self) -> Result<Folded> {
        if let Ok(guard) = self.folded.read() {
            if let Some(f) = guard.as_ref() {
                return Ok(f.clone());
            }
        }
        let k = self.weight.dim(0)?;
        let inv_std = (self.bn.running_var().detach() + self.bn.eps())?
            .sqrt()?
            .recip()?;
        let (scale, shift) = match self.bn.weight_and_bias() {
            Some((g, b)) => (g.detach().mul(&inv_std)?, b.detach()),
            None => (
                inv_std,
                Tensor::zeros(k, self.weight.dtype(), self.weight.device())?,
            ),
        };
        let w = self
            .weight
            .detach()
            .broadcast_mul(&scale.reshape((k, 1, 1, 1))?)?;
        let b = (shift - self.bn.running_mean().detach().mul(&scale)?)?;
        let packed = Some(Arc::new(PackedCache::new(self.weight_format())));
        let f = (w, b, packed);
        if let Ok(mut guard) = self.folded.write() {
            *guard = Some(f.clone());
        }
        Ok(f)
    }

    /// How the inference path packs the folded weights.
    pub fn weight_format(&self) -> WeightFormat {
        if self.half.load(Ordering::Relaxed) {
            WeightFormat::F16
        } else {
            WeightFormat::F32
        }
    }

    /// Sets how the inference path packs the folded weights (for this layer and its clones).
    pub fn set_weight_format(&self, format: WeightFormat) {
        if format != self.weight_format() {
            self.half
                .store(format == WeightFormat::F16, Ordering::Relaxed);
            self.invalidate_folded();
        }
    }

    /// Drops the folded inference weights (call after changing weights outside training).
    pub fn invalidate_folded(&self) {
        if let Ok(mut guard) = self.folded.write() {
            *guard = None;
        }
    }

    /// `relu?(BN(conv(x)))`.
    pub fn forward_act(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !train && self.kernels == ConvKernels::Fast {
            let (w, b, packed) = self.folded()?;
            return kernels::conv2d_bias_act(
                xs,
                &w,
                &b,
                packed,
                self.stride,
                self.pad,
                relu,
                self.kernels,
            );
        }
        let ys = kernels::conv2d(xs, &self.weight, self.stride, self.pad, self.kernels)?;
        if train {
            self.invalidate_folded();
            if self.kernels == ConvKernels::Fast {
                return kernels::batch_norm_train(&ys, &self.bn, relu, self.kernels);
            }
        }
        let ys = self.bn.forward_t(&ys, train)?;
        if relu {
            ys.relu()
        } else {
            Ok(ys)
        }
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(xs, train, false)
    }
}
