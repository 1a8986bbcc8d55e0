//! The candle custom ops over fer-cam's CPU kernels, and the functions the model calls.
//!
//! Every op is a [`Kernel`]: a name, a forward over contiguous f32 arguments, and (for the
//! training ops) a backward built from other kernels. [`Op`] adapts any kernel to candle's
//! `CustomOp1/2/3`, so the storage plumbing exists once. Flat backward outputs (several
//! gradients in one buffer) are split by [`split_flat`].

use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, Var,
};
use candle_nn::BatchNorm;

use super::conv::{self, PackedCache};
use super::geom::{ConvGeom, MapGeom, PoolGeom};
use super::{bn, cbam, reference, ConvKernels};

/// One argument of a kernel: its values (contiguous) and its shape.
pub(crate) struct Arg<'a> {
    pub v: &'a [f32],
    pub shape: &'a Shape,
}

/// An f32 CPU kernel with candle's calling convention: arguments in, one tensor out.
pub(crate) trait Kernel: Send + Sync {
    /// The op's name in candle's graph and in error messages.
    const NAME: &'static str;

    /// Output values and shape from the arguments (in the op's argument order).
    fn forward(&self, args: &[Arg]) -> Result<(Vec<f32>, Shape)>;

    /// The gradient of each argument from the arguments, the forward's result and its gradient
    /// `dy`. Inference-only kernels keep the default: no backward.
    fn backward(&self, _args: &[&Tensor], _res: &Tensor, _dy: &Tensor) -> Result<Grads> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// One gradient per argument (`None`: no gradient flows there).
pub(crate) type Grads = Vec<Option<Tensor>>;

/// A [`Kernel`] as a candle custom op of one, two or three arguments.
pub(crate) struct Op<K>(pub K);

impl<K: Kernel> Op<K> {
    fn run(&self, args: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let args = args
            .iter()
            .enumerate()
            .map(|(i, (s, l))| {
                let CpuStorage::F32(v) = s else {
                    bail!("{}: argument {i}: fast kernels support f32 only", K::NAME)
                };
                match l.contiguous_offsets() {
                    Some((a, b)) => Ok(Arg {
                        v: &v[a..b],
                        shape: l.shape(),
                    }),
                    None => bail!("{}: argument {i} must be contiguous", K::NAME),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let (y, shape) = self.0.forward(&args)?;
        if y.len() != shape.elem_count() {
            bail!("{}: {} values for shape {shape:?}", K::NAME, y.len());
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn grads<const N: usize>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let mut g = self.0.backward(&args, res, dy)?.into_iter();
        Ok(std::array::from_fn(|_| g.next().flatten()))
    }
}

impl<K: Kernel> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(&[(s, l)])
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let [dx] = self.grads([x], res, dy)?;
        Ok(dx)
    }
}

impl<K: Kernel> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(&[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.grads([a, b], res, dy)?;
        Ok((da, db))
    }
}

impl<K: Kernel> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
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
        self.run(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.grads([a, b, c], res, dy)?;
        Ok((da, db, dc))
    }
}

/// Splits a backward kernel's flat output into consecutive parts of the given shapes.
fn split_flat(flat: &Tensor, shapes: &[&Shape]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.elem_count();
            let part = flat.narrow(0, at, n)?.reshape(*s)?;
            at += n;
            Ok(part)
        })
        .collect()
}

/// A flat output of `len` values.
fn flat_out(v: Vec<f32>) -> (Vec<f32>, Shape) {
    let n = v.len();
    (v, Shape::from(n))
}

/// The `(b, c, h, w)` map of a shape.
fn map_geom(s: &Shape) -> Result<MapGeom> {
    let (b, c, h, w) = s.dims4()?;
    Ok(MapGeom { b, c, hw: h * w })
}

fn fast_ok(xs: &Tensor, kernels: ConvKernels) -> bool {
    kernels == ConvKernels::Fast && xs.device().is_cpu() && xs.dtype() == DType::F32
}

// ---- Convolution ----

/// The convolution of an input and a weight of these shapes.
fn conv_geom(xs: &Shape, ws: &Shape, stride: usize, pad: usize) -> Result<ConvGeom> {
    let (b, c, h, w) = xs.dims4()?;
    let (k, c2, kh, kw) = ws.dims4()?;
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

impl Kernel for Conv2d {
    const NAME: &'static str = "fer-conv2d";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let g = conv_geom(a[0].shape, a[1].shape, self.stride, self.pad)?;
        let y = conv::conv2d_forward(&g, a[0].v, a[1].v, None, false, None);
        Ok((y, Shape::from((g.b, g.k, g.oh, g.ow))))
    }

    fn backward(&self, args: &[&Tensor], _res: &Tensor, dy: &Tensor) -> Result<Grads> {
        let (x, w) = (args[0], args[1]);
        let dy = dy.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let (stride, pad) = (self.stride, self.pad);
        // No input gradient where nothing upstream wants one (the stem's input image).
        let dx = match x.track_op() {
            true => Some(dy.apply_op2_no_bwd(
                w,
                &Op(Conv2dBackwardInput {
                    stride,
                    pad,
                    h,
                    w: wd,
                }),
            )?),
            false => None,
        };
        let (_, _, kh, kw) = w.dims4()?;
        let dw = x.apply_op2_no_bwd(
            &dy,
            &Op(Conv2dBackwardWeight {
                stride,
                pad,
                kh,
                kw,
            }),
        )?;
        Ok(vec![dx, Some(dw)])
    }
}

/// `(dy, w) → dx` for an input of spatial size `h × w`.
struct Conv2dBackwardInput {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl Kernel for Conv2dBackwardInput {
    const NAME: &'static str = "fer-conv2d-bwd-input";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let (b, k, _, _) = a[0].shape.dims4()?;
        let (k2, c, kh, kw) = a[1].shape.dims4()?;
        if k != k2 {
            bail!("conv2d backward: gradient has {k} channels, weight {k2}");
        }
        let g = ConvGeom::new(b, c, self.h, self.w, k, kh, kw, self.stride, self.pad)
            .ok_or_else(|| candle_core::Error::Msg("conv2d backward: bad geometry".into()))?;
        if a[0].shape.dims() != [b, k, g.oh, g.ow] {
            bail!(
                "conv2d backward: gradient shape {:?} does not match the output",
                a[0].shape
            );
        }
        let dx = conv::conv2d_backward_input(&g, a[0].v, a[1].v);
        Ok((dx, Shape::from((b, c, self.h, self.w))))
    }
}

/// `(x, dy) → dw` for a `kh × kw` kernel.
struct Conv2dBackwardWeight {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

impl Kernel for Conv2dBackwardWeight {
    const NAME: &'static str = "fer-conv2d-bwd-weight";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let (b, c, h, w) = a[0].shape.dims4()?;
        let (b2, k, oh, ow) = a[1].shape.dims4()?;
        let g = ConvGeom::new(b, c, h, w, k, self.kh, self.kw, self.stride, self.pad)
            .ok_or_else(|| candle_core::Error::Msg("conv2d backward: bad geometry".into()))?;
        if b != b2 || oh != g.oh || ow != g.ow {
            bail!(
                "conv2d backward: gradient shape {:?} does not match the output",
                a[1].shape
            );
        }
        let dw = conv::conv2d_backward_weight(&g, a[0].v, a[1].v);
        Ok((dw, Shape::from((k, c, self.kh, self.kw))))
    }
}

/// Inference-only `relu?(conv2d(x, w) + bias)`, with `w` packed once for the direct kernel.
struct Conv2dBiasAct {
    stride: usize,
    pad: usize,
    relu: bool,
    packed: Option<Arc<PackedCache>>,
}

impl Kernel for Conv2dBiasAct {
    const NAME: &'static str = "fer-conv2d-bias-act";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let g = conv_geom(a[0].shape, a[1].shape, self.stride, self.pad)?;
        let bias = a[2].v;
        if bias.len() != g.k {
            bail!(
                "conv2d: bias has {} values for {} channels",
                bias.len(),
                g.k
            );
        }
        let y = conv::conv2d_forward(
            &g,
            a[0].v,
            a[1].v,
            Some(bias),
            self.relu,
            self.packed.as_deref(),
        );
        Ok((y, Shape::from((g.b, g.k, g.oh, g.ow))))
    }
}

// ---- Max-pool ----

/// Max-pool with square `kernel`, `stride` and padding `pad` (padding is −∞).
#[derive(Debug, Clone, Copy)]
struct MaxPool {
    kernel: usize,
    stride: usize,
    pad: usize,
}

impl MaxPool {
    fn geom(&self, s: &Shape) -> Result<PoolGeom> {
        let (b, c, h, w) = s.dims4()?;
        PoolGeom::new(b * c, h, w, self.kernel, self.stride, self.pad).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "max-pool {}x{} does not fit {h}x{w}",
                self.kernel, self.kernel
            ))
        })
    }
}

impl Kernel for MaxPool {
    const NAME: &'static str = "fer-max-pool";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let g = self.geom(a[0].shape)?;
        let (b, c, _, _) = a[0].shape.dims4()?;
        let y = reference::max_pool_forward(&g, a[0].v);
        Ok((y, Shape::from((b, c, g.oh, g.ow))))
    }

    fn backward(&self, args: &[&Tensor], _res: &Tensor, dy: &Tensor) -> Result<Grads> {
        let dx = args[0].apply_op2_no_bwd(&dy.contiguous()?, &Op(MaxPoolBackward(*self)))?;
        Ok(vec![Some(dx)])
    }
}

/// `(x, dy) → dx` for [`MaxPool`].
struct MaxPoolBackward(MaxPool);

impl Kernel for MaxPoolBackward {
    const NAME: &'static str = "fer-max-pool-bwd";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let g = self.0.geom(a[0].shape)?;
        if a[1].shape.elem_count() != g.planes * g.oh * g.ow {
            bail!(
                "max-pool backward: gradient shape {:?} does not match",
                a[1].shape
            );
        }
        let dx = reference::max_pool_backward(&g, a[0].v, a[1].v);
        Ok((dx, a[0].shape.clone()))
    }
}

// ---- Batch-norm in training ----

/// Batch statistics `(mean, biased var)` handed from a batch-norm forward to its caller and to
/// its backward.
type BnStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

/// Training-mode `relu?(batch_norm(x))` over `(b, c, h, w)` with batch statistics, with backward.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    stats: BnStats,
}

impl Kernel for BatchNormTrain {
    const NAME: &'static str = "fer-batch-norm-train";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let g = map_geom(a[0].shape)?;
        let (gamma, beta) = (a[1].v, a[2].v);
        if gamma.len() != g.c || beta.len() != g.c {
            bail!(
                "batch-norm: {} channels, parameters for {}",
                g.c,
                gamma.len()
            );
        }
        let (y, mean, var) = bn::forward(&g, a[0].v, gamma, beta, self.eps, self.relu);
        if let Ok(mut st) = self.stats.lock() {
            *st = Some((mean, var));
        }
        Ok((y, a[0].shape.clone()))
    }

    fn backward(&self, args: &[&Tensor], _res: &Tensor, dy: &Tensor) -> Result<Grads> {
        let (x, gamma, beta) = (args[0], args[1], args[2]);
        let flat = x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &Op(BatchNormBackward {
                gamma: gamma.to_vec1()?,
                beta: beta.to_vec1()?,
                // The forward's batch statistics, so backward need not recompute them.
                stats: self.stats.lock().ok().and_then(|s| s.clone()),
                eps: self.eps,
                relu: self.relu,
            }),
        )?;
        let parts = split_flat(&flat, &[x.shape(), gamma.shape(), beta.shape()])?;
        Ok(parts.into_iter().map(Some).collect())
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

impl Kernel for BatchNormBackward {
    const NAME: &'static str = "fer-batch-norm-train-bwd";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let g = map_geom(a[0].shape)?;
        if a[1].shape != a[0].shape || self.gamma.len() != g.c {
            bail!("batch-norm backward: shapes disagree");
        }
        let (mut dx, dgamma, dbeta) = bn::backward(
            &g,
            a[0].v,
            a[1].v,
            &self.gamma,
            &self.beta,
            self.stats.as_ref().map(|(m, v)| (&m[..], &v[..])),
            self.eps,
            self.relu,
        );
        dx.extend_from_slice(&dgamma);
        dx.extend_from_slice(&dbeta);
        Ok(flat_out(dx))
    }
}

// ---- CBAM ----

/// Inference-only `relu(CBAM(x) + identity)` with the gate's parameters packed in.
struct CbamResidualRelu(Arc<cbam::CbamParams>);

impl Kernel for CbamResidualRelu {
    const NAME: &'static str = "fer-cbam-residual-relu";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let (b, c, h, w) = a[0].shape.dims4()?;
        if a[1].shape != a[0].shape || c != self.0.channels {
            bail!(
                "cbam: input {:?}, identity {:?}, gate for {} channels",
                a[0].shape,
                a[1].shape,
                self.0.channels
            );
        }
        let y = cbam::cbam_residual_relu(&self.0, a[0].v, a[1].v, b, h, w);
        Ok((y, a[0].shape.clone()))
    }
}

/// CBAM's channel pooling: `x (b,c,h,w) → (b,3,c)`, per channel the spatial mean, the maximum
/// and the index of the maximum (see [`cbam::channel_pool`]).
struct ChannelPool;

impl Kernel for ChannelPool {
    const NAME: &'static str = "fer-channel-pool";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let d = map_geom(a[0].shape)?;
        let out = cbam::channel_pool(&d, a[0].v);
        Ok((out, Shape::from((d.b, 3, d.c))))
    }

    fn backward(&self, args: &[&Tensor], res: &Tensor, dres: &Tensor) -> Result<Grads> {
        let (_, _, h, w) = args[0].dims4()?;
        let dx = res.apply_op2_no_bwd(&dres.contiguous()?, &Op(ChannelPoolBackward { h, w }))?;
        Ok(vec![Some(dx)])
    }
}

/// `(pooled (b,3,c), dpooled) → dx (b,c,h,w)` for [`ChannelPool`].
struct ChannelPoolBackward {
    h: usize,
    w: usize,
}

impl Kernel for ChannelPoolBackward {
    const NAME: &'static str = "fer-channel-pool-bwd";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let (b, three, c) = a[0].shape.dims3()?;
        if three != 3 || a[1].shape != a[0].shape {
            bail!(
                "channel pool backward: shapes {:?} {:?}",
                a[0].shape,
                a[1].shape
            );
        }
        let d = MapGeom {
            b,
            c,
            hw: self.h * self.w,
        };
        let dx = cbam::channel_pool_backward(&d, a[0].v, a[1].v);
        Ok((dx, Shape::from((b, c, self.h, self.w))))
    }
}

/// Training CBAM, first half: `(x (b,c,h,w), g (b,c)) → [mean_c x·g, max_c x·g] (b,2,h,w)`.
struct CbamGatePool;

impl Kernel for CbamGatePool {
    const NAME: &'static str = "fer-cbam-gate-pool";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let d = map_geom(a[0].shape)?;
        if a[1].shape.dims() != [d.b, d.c] {
            bail!(
                "cbam: channel gate {:?} for input {:?}",
                a[1].shape,
                a[0].shape
            );
        }
        let pooled = cbam::gate_pool(&d, a[0].v, a[1].v);
        let (_, _, h, w) = a[0].shape.dims4()?;
        Ok((pooled, Shape::from((d.b, 2, h, w))))
    }

    fn backward(&self, args: &[&Tensor], _res: &Tensor, dpooled: &Tensor) -> Result<Grads> {
        let (x, g) = (args[0], args[1]);
        let flat = x.apply_op3_no_bwd(g, &dpooled.contiguous()?, &Op(CbamGatePoolBackward))?;
        let parts = split_flat(&flat, &[x.shape(), g.shape()])?;
        Ok(parts.into_iter().map(Some).collect())
    }
}

/// `(x, g, dpooled) → [dx…, dg…]` (flat) for [`CbamGatePool`].
struct CbamGatePoolBackward;

impl Kernel for CbamGatePoolBackward {
    const NAME: &'static str = "fer-cbam-gate-pool-bwd";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let d = map_geom(a[0].shape)?;
        let (mut dx, dg) = cbam::gate_pool_backward(&d, a[0].v, a[1].v, a[2].v);
        dx.extend_from_slice(&dg);
        Ok(flat_out(dx))
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

impl Kernel for CbamApply {
    const NAME: &'static str = "fer-cbam-apply";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let d = map_geom(a[0].shape)?;
        if a[1].shape != a[0].shape {
            bail!("cbam: identity {:?} for input {:?}", a[1].shape, a[0].shape);
        }
        let (g, s) = split_gates(&d, a[2].v)?;
        let out = cbam::apply(&d, a[0].v, a[1].v, g, s);
        Ok((out, a[0].shape.clone()))
    }

    fn backward(&self, args: &[&Tensor], res: &Tensor, dout: &Tensor) -> Result<Grads> {
        let (x, identity, gates) = (args[0], args[1], args[2]);
        let flat = x.apply_op3_no_bwd(
            res,
            &dout.contiguous()?,
            &Op(CbamApplyBackward {
                gates: gates.to_vec1()?,
            }),
        )?;
        let parts = split_flat(&flat, &[x.shape(), identity.shape(), gates.shape()])?;
        Ok(parts.into_iter().map(Some).collect())
    }
}

/// `(x, out, dout) → [dx…, d identity…, dg…, ds…]` (flat) for [`CbamApply`].
struct CbamApplyBackward {
    gates: Vec<f32>,
}

impl Kernel for CbamApplyBackward {
    const NAME: &'static str = "fer-cbam-apply-bwd";

    fn forward(&self, a: &[Arg]) -> Result<(Vec<f32>, Shape)> {
        let d = map_geom(a[0].shape)?;
        let (g, s) = split_gates(&d, &self.gates)?;
        Ok(flat_out(cbam::apply_backward(
            &d, a[0].v, a[1].v, a[2].v, g, s,
        )))
    }
}

// ---- What the model calls ----

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
        return xs.contiguous()?.apply_op1(Op(MaxPool {
            kernel,
            stride,
            pad,
        }));
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
        &Op(CbamResidualRelu(params.clone())),
    )?))
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

/// CBAM's channel pooling with the fast kernels: the spatial mean and maximum of every channel of
/// `xs (b, c, h, w)`, `(b, c)` each, in one pass with a one-pass backward. `None` when the fast
/// kernels do not apply.
pub fn channel_pool(xs: &Tensor, kernels: ConvKernels) -> Result<Option<(Tensor, Tensor)>> {
    if !fast_ok(xs, kernels) || xs.rank() != 4 {
        return Ok(None);
    }
    let pooled = xs.contiguous()?.apply_op1(Op(ChannelPool))?;
    Ok(Some((
        pooled.narrow(1, 0, 1)?.squeeze(1)?,
        pooled.narrow(1, 1, 1)?.squeeze(1)?,
    )))
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
    let pooled = xs.apply_op2(&gate.contiguous()?, Op(CbamGatePool))?;
    let s = candle_nn::ops::sigmoid(&spatial(&pooled)?)?;
    let gates = Tensor::cat(&[gate.flatten_all()?, s.flatten_all()?], 0)?;
    Ok(Some(xs.apply_op3(
        &identity.contiguous()?,
        &gates,
        Op(CbamApply),
    )?))
}
