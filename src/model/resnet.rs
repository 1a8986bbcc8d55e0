//! ResNet18 (He et al., CVPR 2016) for 1x48x48 faces, with CBAM in every BasicBlock.
//!
//! Shapes: input `(b, 1, 48, 48)` → features `(b, widths[3])` after global average pooling.
//! With the `conv3x3` stem layer1 runs at 48x48 (then 24, 12, 6); with `conv7x7_pool` at 12x12.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::cbam::Cbam;
use super::conv_bn::ConvBn;
use crate::config::{EncoderConfig, Stem};
use crate::kernels::{self, ConvKernels, WeightFormat};

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
            Some(ConvBn::new(
                c_in,
                c_out,
                1,
                stride,
                0,
                cfg.kernels,
                vb.pp("shortcut"),
            )?)
        } else {
            None
        };
        let cbam = if cfg.cbam {
            Some(Cbam::new(
                c_out,
                cfg.cbam_reduction,
                cfg.kernels,
                vb.pp("cbam"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1: ConvBn::new(c_in, c_out, 3, stride, 1, cfg.kernels, vb.pp("conv1"))?,
            conv2: ConvBn::new(c_out, c_out, 3, 1, 1, cfg.kernels, vb.pp("conv2"))?,
            cbam,
            shortcut,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = self.conv1.forward_act(xs, train, true)?;
        let ys = self.conv2.forward_t(&ys, train)?;
        let identity = match &self.shortcut {
            Some(sc) => sc.forward_t(xs, train)?,
            None => xs.clone(),
        };
        match &self.cbam {
            Some(cbam) => cbam.forward_residual_relu(&ys, &identity, train),
            None => (ys + identity)?.relu(),
        }
    }
}

/// The encoder: stem, four stages of BasicBlocks, global average pool.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    stem_pool: bool,
    blocks: Vec<BasicBlock>,
    out_dim: usize,
    kernels: ConvKernels,
}

impl ResNet {
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let w0 = cfg.widths[0];
        let (stem, stem_pool) = match cfg.stem {
            Stem::Conv3x3 => (
                ConvBn::new(1, w0, 3, 1, 1, cfg.kernels, vb.pp("stem"))?,
                false,
            ),
            Stem::Conv7x7Pool => (
                ConvBn::new(1, w0, 7, 2, 3, cfg.kernels, vb.pp("stem"))?,
                true,
            ),
            Stem::Conv3x3S2 => (
                ConvBn::new(1, w0, 3, 2, 1, cfg.kernels, vb.pp("stem"))?,
                false,
            ),
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
        let net = Self {
            stem,
            stem_pool,
            blocks,
            out_dim: c_in,
            kernels: cfg.kernels,
        };
        net.set_weight_format(cfg.weights);
        Ok(net)
    }

    /// How the convolutions' inference weights are stored.
    pub fn weight_format(&self) -> WeightFormat {
        self.stem.weight_format()
    }

    /// Sets how every convolution's inference weights are stored (the CBAM layers' few
    /// weights stay f32).
    pub fn set_weight_format(&self, format: WeightFormat) {
        self.stem.set_weight_format(format);
        for b in &self.blocks {
            for conv in [Some(&b.conv1), Some(&b.conv2), b.shortcut.as_ref()]
                .into_iter()
                .flatten()
            {
                conv.set_weight_format(format);
            }
        }
    }

    /// Width of the feature vector.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // On the CPU, run the whole pass on a rayon worker: every kernel's parallel loop then
        // starts from inside the pool, instead of the calling thread handing each one over and
        // sleeping until it ends (7x7 stem at batch 1: 8-13% faster). On a GPU the pass stays
        // on the calling thread: there is no CPU loop to gain on, and candle queues CUDA work
        // on each thread's own stream, so a forward pass on a worker would put it on another
        // stream than the backward pass and the frees that follow on the caller.
        if xs.device().is_cpu() {
            rayon::scope(|_| self.forward_in_pool(xs, train))
        } else {
            self.forward_in_pool(xs, train)
        }
    }
}

impl ResNet {
    fn forward_in_pool(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = self.stem.forward_act(xs, train, true)?;
        if self.stem_pool {
            xs = kernels::max_pool2d(&xs, 3, 2, 1, self.kernels)?;
        }
        for block in &self.blocks {
            xs = block.forward_t(&xs, train)?;
        }
        xs.mean((2, 3))
    }
}
