//! ResNet18 (He et al., CVPR 2016) for 1x48x48 faces, with CBAM in every BasicBlock.
//!
//! Shapes: input `(b, 1, 48, 48)` → features `(b, widths[3])` after global average pooling.
//! With the `conv3x3` stem layer1 runs at 48x48 (then 24, 12, 6); with `conv7x7_pool` at 12x12.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{batch_norm, conv2d_no_bias, BatchNorm, Conv2d, Conv2dConfig, VarBuilder};

use super::cbam::Cbam;
use crate::config::{EncoderConfig, Stem};

/// Conv (no bias) followed by batch-norm: the unit every layer of the encoder is made of.
#[derive(Debug, Clone)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d_no_bias(c_in, c_out, kernel, cfg, vb.pp("conv"))?,
            bn: batch_norm(c_out, 1e-5, vb.pp("bn"))?,
        })
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(xs)?, train)
    }
}

/// BasicBlock: conv3x3-BN-ReLU, conv3x3-BN, CBAM, + shortcut, ReLU.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    cbam: Option<Cbam>,
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    pub fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        cfg: &EncoderConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if stride != 1 || c_in != c_out {
            Some(ConvBn::new(c_in, c_out, 1, stride, 0, vb.pp("shortcut"))?)
        } else {
            None
        };
        let cbam = if cfg.cbam {
            Some(Cbam::new(c_out, cfg.cbam_reduction, vb.pp("cbam"))?)
        } else {
            None
        };
        Ok(Self {
            conv1: ConvBn::new(c_in, c_out, 3, stride, 1, vb.pp("conv1"))?,
            conv2: ConvBn::new(c_out, c_out, 3, 1, 1, vb.pp("conv2"))?,
            cbam,
            shortcut,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = self.conv1.forward_t(xs, train)?.relu()?;
        let mut ys = self.conv2.forward_t(&ys, train)?;
        if let Some(cbam) = &self.cbam {
            ys = cbam.forward_t(&ys, train)?;
        }
        let identity = match &self.shortcut {
            Some(sc) => sc.forward_t(xs, train)?,
            None => xs.clone(),
        };
        (ys + identity)?.relu()
    }
}

/// The encoder: stem, four stages of BasicBlocks, global average pool.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    stem_pool: bool,
    blocks: Vec<BasicBlock>,
    out_dim: usize,
}

impl ResNet {
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let w0 = cfg.widths[0];
        let (stem, stem_pool) = match cfg.stem {
            Stem::Conv3x3 => (ConvBn::new(1, w0, 3, 1, 1, vb.pp("stem"))?, false),
            Stem::Conv7x7Pool => (ConvBn::new(1, w0, 7, 2, 3, vb.pp("stem"))?, true),
        };
        let mut blocks = Vec::new();
        let mut c_in = w0;
        for (stage, (&width, &n)) in cfg.widths.iter().zip(cfg.blocks.iter()).enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let vb = vb.pp(format!("layer{}.{}", stage + 1, i));
                blocks.push(BasicBlock::new(c_in, width, stride, cfg, vb)?);
                c_in = width;
            }
        }
        Ok(Self {
            stem,
            stem_pool,
            blocks,
            out_dim: c_in,
        })
    }

    /// Width of the feature vector.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
}

/// 3x3 stride-2 max-pool with padding 1. Inputs are post-ReLU (≥ 0), so zero padding is
/// equivalent to the usual −∞ padding.
fn max_pool_3x3_s2(xs: &Tensor) -> Result<Tensor> {
    let xs = xs.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    xs.max_pool2d_with_stride(3, 2)
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = self.stem.forward_t(xs, train)?.relu()?;
        if self.stem_pool {
            xs = max_pool_3x3_s2(&xs)?;
        }
        for block in &self.blocks {
            xs = block.forward_t(&xs, train)?;
        }
        xs.mean((2, 3))
    }
}
