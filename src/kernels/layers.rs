//! What the model calls: each layer function runs fer-cam's CPU kernels (as the candle ops of
//! [`super::ops`]) on f32 CPU tensors with [`ConvKernels::Fast`], and candle's own ops everywhere
//! else (other devices and dtypes, [`ConvKernels::Candle`]). One convention for every function:
//! it returns the layer's result either way. Where the candle form of a layer is the model's own
//! composition (CBAM), the caller passes it in as `reference`.

use std::sync::Arc;

use candle_core::{bail, DType, Result, Tensor, Var, D};
use candle_nn::BatchNorm;

use super::cbam::CbamParams;
use super::conv::PackedCache;
use super::ops::{
    BatchNormTrain, BnStats, CbamApply, CbamGatePool, CbamResidualRelu, ChannelPool, Conv2d,
    Conv2dBiasAct, MaxPool, Op,
};
use super::{reference, ConvKernels};

/// Whether the fast kernels take `xs`.
fn fast_ok(xs: &Tensor, kernels: ConvKernels) -> bool {
    kernels == ConvKernels::Fast && xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// 2-D convolution without bias, square kernel, with gradients for input and weight.
pub fn conv2d(
    xs: &Tensor,
    ws: &Tensor,
    stride: usize,
    pad: usize,
    kernels: ConvKernels,
) -> Result<Tensor> {
    if fast_ok(xs, kernels) {
        xs.contiguous()?
            .apply_op2(&ws.contiguous()?, Op(Conv2d { stride, pad }))
    } else {
        xs.conv2d(ws, pad, stride, 1, 1)
    }
}

/// Inference-only `relu?(conv2d(x, w) + bias)` with `bias` of shape `(k,)`. `packed` keeps the
/// packed forms of `w` across calls; it must only ever be used with this `w`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bias_act(
    xs: &Tensor,
    ws: &Tensor,
    bias: &Tensor,
    packed: Option<Arc<PackedCache>>,
    stride: usize,
    pad: usize,
    relu: bool,
    kernels: ConvKernels,
) -> Result<Tensor> {
    if fast_ok(xs, kernels) {
        xs.contiguous()?.apply_op3_no_bwd(
            &ws.contiguous()?,
            &bias.contiguous()?,
            &Op(Conv2dBiasAct {
                stride,
                pad,
                relu,
                packed,
            }),
        )
    } else {
        let k = bias.dim(0)?;
        let ys = xs
            .conv2d(ws, pad, stride, 1, 1)?
            .broadcast_add(&bias.reshape((1, k, 1, 1))?)?;
        if relu {
            ys.relu()
        } else {
            Ok(ys)
        }
    }
}

/// Max-pool with square `kernel`, `stride`, padding `pad` (−∞), with backward.
pub fn max_pool2d(
    xs: &Tensor,
    kernel: usize,
    stride: usize,
    pad: usize,
    kernels: ConvKernels,
) -> Result<Tensor> {
    if !fast_ok(xs, kernels) {
        return reference::max_pool2d_candle(xs, kernel, stride, pad);
    }
    xs.contiguous()?.apply_op1(Op(MaxPool {
        kernel,
        stride,
        pad,
    }))
}

/// Training-mode `relu?(bn(x))` for `x (b, c, h, w)`, updating `bn`'s running statistics as
/// candle's `BatchNorm::forward_train` does (momentum, unbiased variance). The fast kernel runs
/// for f32 CPU tensors with an affine `bn`; anything else goes through candle's ops.
pub fn batch_norm_train(
    xs: &Tensor,
    bnorm: &BatchNorm,
    relu: bool,
    kernels: ConvKernels,
) -> Result<Tensor> {
    let affine = bnorm.weight_and_bias();
    let (Some((gamma, beta)), true) = (affine, fast_ok(xs, kernels) && xs.rank() == 4) else {
        let ys = bnorm.forward_train(xs)?;
        return if relu { ys.relu() } else { Ok(ys) };
    };
    let stats: BnStats = Arc::default();
    let op = BatchNormTrain {
        eps: bnorm.eps(),
        relu,
        stats: stats.clone(),
    };
    let ys = xs
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, Op(op))?;
    // Cloned, not taken: the op keeps them for its backward.
    let Some((mean, var)) = stats.lock().ok().and_then(|s| s.clone()) else {
        bail!("batch-norm: forward produced no statistics")
    };
    let (b, c, h, w) = xs.dims4()?;
    let n = (b * h * w) as f64;
    let m = bnorm.momentum();
    let dev = xs.device();
    let mean = Tensor::from_vec(mean, c, dev)?;
    let var = Tensor::from_vec(var, c, dev)?;
    let rm = ((bnorm.running_mean() * (1.0 - m))? + (mean * m)?)?;
    let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
    let rv = ((bnorm.running_var() * (1.0 - m))? + (var * (m * unbias))?)?;
    Var::from_tensor(bnorm.running_mean())?.set(&rm)?;
    Var::from_tensor(bnorm.running_var())?.set(&rv)?;
    Ok(ys)
}

/// The spatial mean and maximum of every channel of `xs (b, c, h, w)`, `(b, c)` each (CBAM's
/// channel pooling): one pass with a one-pass backward on the fast kernels.
pub fn channel_pool(xs: &Tensor, kernels: ConvKernels) -> Result<(Tensor, Tensor)> {
    if !fast_ok(xs, kernels) || xs.rank() != 4 {
        let flat = xs.flatten_from(2)?;
        return Ok((flat.mean(D::Minus1)?, flat.max(D::Minus1)?));
    }
    let pooled = xs.contiguous()?.apply_op1(Op(ChannelPool))?;
    Ok((
        pooled.narrow(1, 0, 1)?.squeeze(1)?,
        pooled.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

/// Inference-mode `relu(CBAM(x) + identity)`, in one pass over the feature map on the fast
/// kernels with the block's packed parameters (`params`, asked for only there); `reference`
/// otherwise.
pub fn cbam_residual_relu(
    xs: &Tensor,
    identity: &Tensor,
    params: impl FnOnce() -> Result<Arc<CbamParams>>,
    kernels: ConvKernels,
    reference: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    if !fast_ok(xs, kernels) {
        return reference();
    }
    xs.contiguous()?
        .apply_op2_no_bwd(&identity.contiguous()?, &Op(CbamResidualRelu(params()?)))
}

/// Training-mode end of a CBAM residual block: `relu(x·g·σ(att) + identity)`, where `gate` maps
/// `x` to its channel gate `g (b, c)` and `spatial` maps the pooled `(b, 2, h, w)` map of `x·g`
/// to the spatial attention logits `att (b, 1, h, w)`. On the fast kernels the gating, pooling
/// and residual are fused ops with a one-pass backward; `reference` otherwise.
pub fn cbam_train_residual_relu(
    xs: &Tensor,
    identity: &Tensor,
    gate: impl FnOnce(&Tensor) -> Result<Tensor>,
    spatial: impl FnOnce(&Tensor) -> Result<Tensor>,
    kernels: ConvKernels,
    reference: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    if !fast_ok(xs, kernels) || xs.rank() != 4 {
        return reference();
    }
    let gate = gate(xs)?;
    let xs = xs.contiguous()?;
    let pooled = xs.apply_op2(&gate.contiguous()?, Op(CbamGatePool))?;
    let s = candle_nn::ops::sigmoid(&spatial(&pooled)?)?;
    let gates = Tensor::cat(&[gate.flatten_all()?, s.flatten_all()?], 0)?;
    xs.apply_op3(&identity.contiguous()?, &gates, Op(CbamApply))
}
