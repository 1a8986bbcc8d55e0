//! Custom candle ops for the encoder's hot paths: convolution (forward, input and weight
//! gradients), a fused conv + bias + ReLU for inference with batch-norm folded in, an overlapping
//! max-pool with backward, and fused training-mode batch-norm and CBAM gates with backward.
//!
//! Layout, from the ground up: [`geom`] (shapes only); [`reference`](mod@reference) (im2col + GEMM and pooling,
//! the portable path every fast path is tested against); the fast paths [`winograd`]
//! (F(2x2,3x3), F(4x4,3x3)), [`direct`] (implicit GEMM on an AVX-512 micro-kernel), [`wgrad`],
//! [`bn`] and [`cbam`]; [`conv`], the per-layer choice between them; and the candle custom ops
//! that wrap them here. candle's built-in ops are the reference in the parity tests
//! (`tests/kernels.rs`). Tensors on other devices fall back to candle's ops, so the model code is
//! device-agnostic. The CARD sampler's kernels ([`sampler`], [`dense`], [`softplus`]) work on
//! plain slices.

/// Calls `$avx::$f` (a loop compiled with `#[target_feature(enable = "avx512f")]`) where the CPU
/// has AVX-512, else the baseline build `$base::$f` of the same loop.
macro_rules! avx512_or {
    ($avx:ident, $base:ident, $f:ident($($a:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::kernels::direct::available() {
                // SAFETY: AVX-512F is present (checked at run time).
                unsafe { $avx::$f($($a),*) }
            } else {
                $base::$f($($a),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $base::$f($($a),*)
        }
    }};
}

/// Defines the given loops twice: in module `$base` for the baseline target, inlined into their
/// callers, and in module `$avx`, the same code compiled with `#[target_feature(enable =
/// "avx512f")]` (wider vectors). Callers pick one with [`avx512_or!`].
macro_rules! avx512_twins {
    (
        $(#[$doc:meta])*
        $base:ident, $avx:ident;
        $(
            $(#[$m:meta])*
            pub fn $f:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block
        )*
    ) => {
        $(#[$doc])*
        mod $base {
            $(
                $(#[$m])*
                #[inline(always)]
                #[allow(clippy::too_many_arguments)]
                pub fn $f($($a: $t),*) $(-> $r)? $body
            )*
        }

        /// The same loops compiled for AVX-512.
        #[cfg(target_arch = "x86_64")]
        mod $avx {
            $(
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                pub fn $f($($a: $t),*) $(-> $r)? {
                    super::$base::$f($($a),*)
                }
            )*
        }
    };
}

/// `M` sums `Σ f(a[i], b[i], …)` over the columns `cols` (up to the shortest), each in 16
/// independent f32 lanes so that the compiler vectorises the loop (a single running sum is a
/// dependency chain it must keep in order), then added up in f64. `f` sees one value of each
/// column; the columns are read in chunks of 16, one bounds check per column per chunk.
#[inline(always)]
pub(crate) fn lane_sums<const N: usize, const M: usize>(
    cols: [&[f32]; N],
    f: impl Fn([f32; N]) -> [f32; M],
) -> [f64; M] {
    let n = cols.iter().map(|c| c.len()).min().unwrap_or(0);
    let full = n - n % 16;
    let mut acc = [[0f32; 16]; M];
    let mut base = 0;
    while base < full {
        let chunk: [&[f32; 16]; N] = cols.map(|c| {
            c[base..base + 16]
                .try_into()
                .expect("16 floats (inside the shortest column)")
        });
        for l in 0..16 {
            for (a, v) in acc.iter_mut().zip(f(chunk.map(|c| c[l]))) {
                a[l] += v;
            }
        }
        base += 16;
    }
    let mut total = acc.map(|lanes| lanes.iter().map(|&v| v as f64).sum::<f64>());
    for i in full..n {
        for (t, v) in total.iter_mut().zip(f(cols.map(|c| c[i]))) {
            *t += v as f64;
        }
    }
    total
}

pub mod bn;
pub mod cbam;
pub mod conv;
pub mod dense;
pub mod direct;
pub mod geom;
pub mod reference;
pub mod sampler;
pub mod softplus;
pub mod wgrad;
pub mod winograd;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use std::sync::{Arc, Mutex};

use candle_core::Var;
use candle_nn::BatchNorm;

use conv::PackedCache;
use geom::{ConvGeom, MapGeom, PoolGeom};

/// Which implementation the encoder's convolutions and pools use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvKernels {
    /// fer-cam's GEMM kernels on CPU tensors (candle's ops elsewhere).
    #[default]
    Fast,
    /// candle's built-in conv2d / max-pool everywhere (the reference).
    Candle,
}

/// How the inference path stores the convolution weights it packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// f32, as trained.
    #[default]
    F32,
    /// IEEE half precision for the layers of at most 16 output positions (4x4) per image;
    /// every product and sum stays f32.
    ///
    /// With the 7x7 stem these are stages 3 and 4 (3x3 and 2x2 maps), over 90% of the encoder's
    /// weights, which at batch 1 stream from memory for a few products each; the 3x3 stem has
    /// no such layer. Each BN-folded weight is rounded once (relative error ≤ 2⁻¹¹); a layer
    /// with a weight beyond half's range keeps f32.
    F16,
}

impl WeightFormat {
    /// `f32` or `f16`, as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: fast kernels support f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

fn geom(xs: &Layout, ws: &Layout, stride: usize, pad: usize) -> Result<ConvGeom> {
    let (b, c, h, w) = xs.shape().dims4()?;
    let (k, c2, kh, kw) = ws.shape().dims4()?;
    if c != c2 {
        bail!("conv2d: input has {c} channels, weight expects {c2}");
    }
    ConvGeom::new(b, c, h, w, k, kh, kw, stride, pad).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "conv2d: kernel {kh}x{kw} does not fit {h}x{w} with padding {pad}"
        ))
    })
}

/// `conv2d(x, w)` with backward.
#[derive(Debug, Clone, Copy)]
struct Conv2d {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "fer-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geom(l1, l2, self.stride, self.pad)?;
        let y = conv::conv2d_forward(
            &g,
            f32_slice(s1, l1, "conv2d input")?,
            f32_slice(s2, l2, "conv2d weight")?,
            None,
            false,
            None,
        );
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.k, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        // No input gradient where nothing upstream wants one (the stem's input image).
        let dx = match x.track_op() {
            true => Some(dy.apply_op2_no_bwd(
                w,
                &Conv2dBackwardInput {
                    stride: self.stride,
                    pad: self.pad,
                    h,
                    w: wd,
                },
            )?),
            false => None,
        };
        let (_, _, kh, kw) = w.dims4()?;
        let dw = x.apply_op2_no_bwd(
            &dy,
            &Conv2dBackwardWeight {
                stride: self.stride,
                pad: self.pad,
                kh,
                kw,
            },
        )?;
        Ok((dx, Some(dw)))
    }
}

/// `(dy, w) → dx` for an input of spatial size `h × w`.
struct Conv2dBackwardInput {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for Conv2dBackwardInput {
    fn name(&self) -> &'static str {
        "fer-conv2d-bwd-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, k, _, _) = l1.shape().dims4()?;
        let (k2, c, kh, kw) = l2.shape().dims4()?;
        if k != k2 {
            bail!("conv2d backward: gradient has {k} channels, weight {k2}");
        }
        let g = ConvGeom::new(b, c, self.h, self.w, k, kh, kw, self.stride, self.pad)
            .ok_or_else(|| candle_core::Error::Msg("conv2d backward: bad geometry".into()))?;
        if l1.shape().dims() != [b, k, g.oh, g.ow] {
            bail!(
                "conv2d backward: gradient shape {:?} does not match the output",
                l1.shape()
            );
        }
        let dx = conv::conv2d_backward_input(
            &g,
            f32_slice(s1, l1, "conv2d grad")?,
            f32_slice(s2, l2, "conv2d weight")?,
        );
        Ok((CpuStorage::F32(dx), Shape::from((b, c, self.h, self.w))))
    }
}

/// `(x, dy) → dw` for a `kh × kw` kernel.
struct Conv2dBackwardWeight {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for Conv2dBackwardWeight {
    fn name(&self) -> &'static str {
        "fer-conv2d-bwd-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (b2, k, oh, ow) = l2.shape().dims4()?;
        let g = ConvGeom::new(b, c, h, w, k, self.kh, self.kw, self.stride, self.pad)
            .ok_or_else(|| candle_core::Error::Msg("conv2d backward: bad geometry".into()))?;
        if b != b2 || oh != g.oh || ow != g.ow {
            bail!(
                "conv2d backward: gradient shape {:?} does not match the output",
                l2.shape()
            );
        }
        let dw = conv::conv2d_backward_weight(
            &g,
            f32_slice(s1, l1, "conv2d input")?,
            f32_slice(s2, l2, "conv2d grad")?,
        );
        Ok((CpuStorage::F32(dw), Shape::from((k, c, self.kh, self.kw))))
    }
}

/// Inference-only `relu?(conv2d(x, w) + bias)`, with `w` packed once for the direct kernel.
struct Conv2dBiasAct {
    stride: usize,
    pad: usize,
    relu: bool,
    packed: Option<Arc<PackedCache>>,
}

impl CustomOp3 for Conv2dBiasAct {
    fn name(&self) -> &'static str {
        "fer-conv2d-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geom(l1, l2, self.stride, self.pad)?;
        let bias = f32_slice(s3, l3, "conv2d bias")?;
        if bias.len() != g.k {
            bail!(
                "conv2d: bias has {} values for {} channels",
                bias.len(),
                g.k
            );
        }
        let y = conv::conv2d_forward(
            &g,
            f32_slice(s1, l1, "conv2d input")?,
            f32_slice(s2, l2, "conv2d weight")?,
            Some(bias),
            self.relu,
            self.packed.as_deref(),
        );
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.k, g.oh, g.ow))))
    }
}

/// Max-pool with square `kernel`, `stride` and padding `pad` (padding is −∞).
#[derive(Debug, Clone, Copy)]
struct MaxPool {
    kernel: usize,
    stride: usize,
    pad: usize,
}

impl MaxPool {
    fn geom(&self, l: &Layout) -> Result<PoolGeom> {
        let (b, c, h, w) = l.shape().dims4()?;
        PoolGeom::new(b * c, h, w, self.kernel, self.stride, self.pad).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "max-pool {}x{} does not fit {h}x{w}",
                self.kernel, self.kernel
            ))
        })
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "fer-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let y = reference::max_pool_forward(&g, f32_slice(s, l, "max-pool input")?);
        Ok((CpuStorage::F32(y), Shape::from((b, c, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &MaxPoolBackward(*self),
        )?))
    }
}

struct MaxPoolBackward(MaxPool);

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "fer-max-pool-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0.geom(l1)?;
        if l2.shape().elem_count() != g.planes * g.oh * g.ow {
            bail!(
                "max-pool backward: gradient shape {:?} does not match",
                l2.shape()
            );
        }
        let dx = reference::max_pool_backward(
            &g,
            f32_slice(s1, l1, "max-pool input")?,
            f32_slice(s2, l2, "max-pool grad")?,
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

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
            .apply_op2(&ws.contiguous()?, Conv2d { stride, pad })
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
            &Conv2dBiasAct {
                stride,
                pad,
                relu,
                packed,
            },
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
///
/// candle's own max-pool has no padding and no backward for overlapping windows, so the reference
/// path is built from differentiable candle ops: the element-wise maximum of the `kernel²` shifted
/// views at stride 1, then every `stride`-th row and column.
pub fn max_pool2d(
    xs: &Tensor,
    kernel: usize,
    stride: usize,
    pad: usize,
    kernels: ConvKernels,
) -> Result<Tensor> {
    if fast_ok(xs, kernels) {
        return xs.contiguous()?.apply_op1(MaxPool {
            kernel,
            stride,
            pad,
        });
    }
    let (b, c, h, w) = xs.dims4()?;
    let g = PoolGeom::new(b * c, h, w, kernel, stride, pad).ok_or_else(|| {
        candle_core::Error::Msg(format!("max-pool {kernel}x{kernel} does not fit {h}x{w}"))
    })?;
    let xs = if pad > 0 {
        let fill = |hh: usize, ww: usize| {
            Tensor::full(f32::MIN, (b, c, hh, ww), xs.device())?.to_dtype(xs.dtype())
        };
        let row = fill(pad, w)?;
        let xs = Tensor::cat(&[&row, xs, &row], 2)?;
        let col = fill(h + 2 * pad, pad)?;
        Tensor::cat(&[&col, &xs, &col], 3)?
    } else {
        xs.clone()
    };
    // Stride-1 maxima over the window.
    let (h1, w1) = (h + 2 * pad - kernel + 1, w + 2 * pad - kernel + 1);
    let mut m: Option<Tensor> = None;
    for dy in 0..kernel {
        for dx in 0..kernel {
            let v = xs.narrow(2, dy, h1)?.narrow(3, dx, w1)?;
            m = Some(match m {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    let m = m.ok_or_else(|| candle_core::Error::Msg("max-pool: empty kernel".into()))?;
    // Subsample: keep rows/cols 0, s, 2s, ... via pad-reshape-narrow.
    let sub = |t: Tensor, dim: usize, len: usize, out: usize| -> Result<Tensor> {
        let full = out * stride;
        let t = if full > len {
            t.pad_with_zeros(dim, 0, full - len)?
        } else {
            t.narrow(dim, 0, full)?
        };
        let mut shape = t.dims().to_vec();
        shape[dim] = out;
        shape.insert(dim + 1, stride);
        t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
    };
    let m = sub(m, 2, h1, g.oh)?;
    sub(m, 3, w1, g.ow)
}

/// Inference-only `relu(CBAM(x) + identity)` with the gate's parameters packed in.
struct CbamResidualRelu(std::sync::Arc<cbam::CbamParams>);

impl CustomOp2 for CbamResidualRelu {
    fn name(&self) -> &'static str {
        "fer-cbam-residual-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || c != self.0.channels {
            bail!(
                "cbam: input {:?}, identity {:?}, gate for {} channels",
                l1.shape(),
                l2.shape(),
                self.0.channels
            );
        }
        let y = cbam::cbam_residual_relu(
            &self.0,
            f32_slice(s1, l1, "cbam input")?,
            f32_slice(s2, l2, "cbam identity")?,
            b,
            h,
            w,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// `relu(CBAM(x) + identity)` in one pass over the feature map (CPU, f32, inference only).
/// Returns `None` when the fast path does not apply, so the caller uses candle's ops.
pub fn cbam_residual_relu(
    xs: &Tensor,
    identity: &Tensor,
    params: &std::sync::Arc<cbam::CbamParams>,
    kernels: ConvKernels,
) -> Result<Option<Tensor>> {
    if !fast_ok(xs, kernels) {
        return Ok(None);
    }
    Ok(Some(xs.contiguous()?.apply_op2_no_bwd(
        &identity.contiguous()?,
        &CbamResidualRelu(params.clone()),
    )?))
}

/// Batch statistics `(mean, biased var)` handed from a batch-norm forward to its caller and to
/// its backward.
type BnStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

/// Training-mode `relu?(batch_norm(x))` over `(b, c, h, w)` with batch statistics, with backward.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    stats: BnStats,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "fer-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = map_geom(l1)?;
        let gamma = f32_slice(s2, l2, "batch-norm weight")?;
        let beta = f32_slice(s3, l3, "batch-norm bias")?;
        if gamma.len() != g.c || beta.len() != g.c {
            bail!(
                "batch-norm: {} channels, parameters for {}",
                g.c,
                gamma.len()
            );
        }
        let x = f32_slice(s1, l1, "batch-norm input")?;
        let (y, mean, var) = bn::forward(&g, x, gamma, beta, self.eps, self.relu);
        if let Ok(mut st) = self.stats.lock() {
            *st = Some((mean, var));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.dim(0)?;
        let len = x.elem_count();
        let flat = x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &BatchNormBackward {
                gamma: gamma.to_vec1()?,
                beta: beta.to_vec1()?,
                // The forward's batch statistics, so backward need not recompute them.
                stats: self.stats.lock().ok().and_then(|s| s.clone()),
                eps: self.eps,
                relu: self.relu,
            },
        )?;
        let dx = flat.narrow(0, 0, len)?.reshape(x.shape())?;
        let dgamma = flat.narrow(0, len, c)?;
        let dbeta = flat.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, dy) → [dx…, dγ…, dβ…]` (flat) for [`BatchNormTrain`].
struct BatchNormBackward {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    stats: Option<(Vec<f32>, Vec<f32>)>,
    eps: f64,
    relu: bool,
}

impl CustomOp2 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "fer-batch-norm-train-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = map_geom(l1)?;
        if l2.shape() != l1.shape() || self.gamma.len() != g.c {
            bail!("batch-norm backward: shapes disagree");
        }
        let (mut dx, dgamma, dbeta) = bn::backward(
            &g,
            f32_slice(s1, l1, "batch-norm input")?,
            f32_slice(s2, l2, "batch-norm grad")?,
            &self.gamma,
            &self.beta,
            self.stats.as_ref().map(|(m, v)| (&m[..], &v[..])),
            self.eps,
            self.relu,
        );
        dx.extend_from_slice(&dgamma);
        dx.extend_from_slice(&dbeta);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
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
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
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

/// The `(b, c, h, w)` map laid out by `l`.
fn map_geom(l: &Layout) -> Result<MapGeom> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok(MapGeom { b, c, hw: h * w })
}

/// CBAM's channel pooling: `x (b,c,h,w) → (b,3,c)`, per channel the spatial mean, the maximum
/// and the index of the maximum (see [`cbam::channel_pool`]).
struct ChannelPool;

impl CustomOp1 for ChannelPool {
    fn name(&self) -> &'static str {
        "fer-channel-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = map_geom(l)?;
        let out = cbam::channel_pool(&d, f32_slice(s, l, "channel pool input")?);
        Ok((CpuStorage::F32(out), Shape::from((d.b, 3, d.c))))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, dres: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let dx = res.apply_op2_no_bwd(&dres.contiguous()?, &ChannelPoolBackward { h, w })?;
        Ok(Some(dx))
    }
}

/// `(pooled (b,3,c), dpooled) → dx (b,c,h,w)` for [`ChannelPool`].
struct ChannelPoolBackward {
    h: usize,
    w: usize,
}

impl CustomOp2 for ChannelPoolBackward {
    fn name(&self) -> &'static str {
        "fer-channel-pool-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, three, c) = l1.shape().dims3()?;
        if three != 3 || l2.shape() != l1.shape() {
            bail!(
                "channel pool backward: shapes {:?} {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let d = MapGeom {
            b,
            c,
            hw: self.h * self.w,
        };
        let dx = cbam::channel_pool_backward(
            &d,
            f32_slice(s1, l1, "channel pool output")?,
            f32_slice(s2, l2, "channel pool grad")?,
        );
        Ok((CpuStorage::F32(dx), Shape::from((b, c, self.h, self.w))))
    }
}

/// CBAM's channel pooling with the fast kernels: the spatial mean and maximum of every channel of
/// `xs (b, c, h, w)`, `(b, c)` each, in one pass with a one-pass backward. `None` when the fast
/// kernels do not apply.
pub fn channel_pool(xs: &Tensor, kernels: ConvKernels) -> Result<Option<(Tensor, Tensor)>> {
    if !fast_ok(xs, kernels) || xs.rank() != 4 {
        return Ok(None);
    }
    let pooled = xs.contiguous()?.apply_op1(ChannelPool)?;
    Ok(Some((
        pooled.narrow(1, 0, 1)?.squeeze(1)?,
        pooled.narrow(1, 1, 1)?.squeeze(1)?,
    )))
}

/// Training CBAM, first half: `(x (b,c,h,w), g (b,c)) → [mean_c x·g, max_c x·g] (b,2,h,w)`.
struct CbamGatePool;

impl CustomOp2 for CbamGatePool {
    fn name(&self) -> &'static str {
        "fer-cbam-gate-pool"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = map_geom(l1)?;
        if l2.shape().dims() != [d.b, d.c] {
            bail!(
                "cbam: channel gate {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let pooled = cbam::gate_pool(
            &d,
            f32_slice(s1, l1, "cbam input")?,
            f32_slice(s2, l2, "cbam channel gate")?,
        );
        let (_, _, h, w) = l1.shape().dims4()?;
        Ok((CpuStorage::F32(pooled), Shape::from((d.b, 2, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        dpooled: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(g, &dpooled.contiguous()?, &CbamGatePoolBackward)?;
        let len = x.elem_count();
        let dx = flat.narrow(0, 0, len)?.reshape(x.shape())?;
        let dg = flat.narrow(0, len, g.elem_count())?.reshape(g.shape())?;
        Ok((Some(dx), Some(dg)))
    }
}

/// `(x, g, dpooled) → [dx…, dg…]` (flat) for [`CbamGatePool`].
struct CbamGatePoolBackward;

impl CustomOp3 for CbamGatePoolBackward {
    fn name(&self) -> &'static str {
        "fer-cbam-gate-pool-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = map_geom(l1)?;
        let (mut dx, dg) = cbam::gate_pool_backward(
            &d,
            f32_slice(s1, l1, "cbam input")?,
            f32_slice(s2, l2, "cbam channel gate")?,
            f32_slice(s3, l3, "cbam pooled grad")?,
        );
        dx.extend_from_slice(&dg);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
}

/// Training CBAM, second half: `relu(x·g·s + identity)` with `gates = [g (b·c); s (b·h·w)]`.
struct CbamApply;

fn split_gates<'a>(d: &MapGeom, gates: &'a [f32]) -> Result<(&'a [f32], &'a [f32])> {
    if gates.len() != d.b * (d.c + d.hw) {
        bail!("cbam: {} gate values for {:?}", gates.len(), d);
    }
    Ok(gates.split_at(d.b * d.c))
}

impl CustomOp3 for CbamApply {
    fn name(&self) -> &'static str {
        "fer-cbam-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = map_geom(l1)?;
        if l2.shape() != l1.shape() {
            bail!("cbam: identity {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (g, s) = split_gates(&d, f32_slice(s3, l3, "cbam gates")?)?;
        let out = cbam::apply(
            &d,
            f32_slice(s1, l1, "cbam input")?,
            f32_slice(s2, l2, "cbam identity")?,
            g,
            s,
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        identity: &Tensor,
        gates: &Tensor,
        res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(
            res,
            &dout.contiguous()?,
            &CbamApplyBackward {
                gates: gates.to_vec1()?,
            },
        )?;
        let len = x.elem_count();
        let dx = flat.narrow(0, 0, len)?.reshape(x.shape())?;
        let did = flat.narrow(0, len, len)?.reshape(identity.shape())?;
        let dgates = flat.narrow(0, 2 * len, gates.elem_count())?;
        Ok((Some(dx), Some(did), Some(dgates)))
    }
}

/// `(x, out, dout) → [dx…, d identity…, dg…, ds…]` (flat) for [`CbamApply`].
struct CbamApplyBackward {
    gates: Vec<f32>,
}

impl CustomOp3 for CbamApplyBackward {
    fn name(&self) -> &'static str {
        "fer-cbam-apply-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = map_geom(l1)?;
        let (g, s) = split_gates(&d, &self.gates)?;
        let flat = cbam::apply_backward(
            &d,
            f32_slice(s1, l1, "cbam input")?,
            f32_slice(s2, l2, "cbam output")?,
            f32_slice(s3, l3, "cbam grad")?,
            g,
            s,
        );
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }
}

/// `len` zeros in a vector with capacity for `extra` more floats: a custom op's flat output that
/// gets small parts appended without a reallocation (which would copy the large part).
pub(crate) fn zeros_with_room(len: usize, extra: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + extra);
    v.resize(len, 0.0);
    v
}

/// Training-mode end of a CBAM residual block with the fast kernels:
/// `relu(x·g·σ(att) + identity)`, where `g (b, c)` is the channel gate and `spatial` maps the
/// pooled `(b, 2, h, w)` map of `x·g` to the spatial attention logits `att (b, 1, h, w)`.
/// `None` when the fast kernels do not apply (then the caller composes candle ops).
pub fn cbam_train_residual_relu(
    xs: &Tensor,
    identity: &Tensor,
    gate: &Tensor,
    spatial: impl FnOnce(&Tensor) -> Result<Tensor>,
    kernels: ConvKernels,
) -> Result<Option<Tensor>> {
    if !fast_ok(xs, kernels) || xs.rank() != 4 {
        return Ok(None);
    }
    let xs = xs.contiguous()?;
    let pooled = xs.apply_op2(&gate.contiguous()?, CbamGatePool)?;
    let s = candle_nn::ops::sigmoid(&spatial(&pooled)?)?;
    let gates = Tensor::cat(&[gate.flatten_all()?, s.flatten_all()?], 0)?;
    Ok(Some(xs.apply_op3(
        &identity.contiguous()?,
        &gates,
        CbamApply,
    )?))
}
