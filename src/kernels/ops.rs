//! The candle custom ops over fer-cam's CPU kernels (what the model calls, with candle's ops
//! where these do not apply, is in [`super::layers`]).
//!
//! Every op is a [`Kernel`]: a name, a forward over contiguous f32 arguments, and (for the
//! training ops) a backward built from other kernels. [`Op`] adapts any kernel to candle's
//! `CustomOp1/2/3`, so the storage plumbing exists once. Flat backward outputs (several
//! gradients in one buffer) are split by [`split_flat`].

use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};

use super::conv::{self, PackedCache};
use super::geom::{ConvGeom, MapGeom, PoolGeom};
use super::{bn, cbam, reference};

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
pub(super) struct Conv2d {
    pub(super) stride: usize,
    pub(super) pad: usize,
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
pub(super) struct Conv2dBiasAct {
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) relu: bool,
    pub(super) packed: Option<Arc<PackedCache>>,
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
pub(super) struct MaxPool {
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
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
pub(super) type BnStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

/// Training-mode `relu?(batch_norm(x))` over `(b, c, h, w)` with batch statistics, with backward.
pub(super) struct BatchNormTrain {
    pub(super) eps: f64,
    pub(super) relu: bool,
    pub(super) stats: BnStats,
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
pub(super) struct CbamResidualRelu(pub(super) Arc<cbam::CbamParams>);

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
pub(super) struct ChannelPool;

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
pub(super) struct CbamGatePool;

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
pub(super) struct CbamApply;

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
