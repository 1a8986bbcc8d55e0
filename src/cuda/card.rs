//! The CARD sampler on the GPU. [`GpuCard`] keeps ε_θ's folded weights (the CPU
//! [`FusedCard`]'s, transposed where the kernel reads columns) on the device, and draws every
//! face × sample × step of the reverse chain in one launch (`card_chain`) after one small
//! launch for the per-face embeddings (`card_embed`); `card_summary` then reduces the samples
//! per face. The noise is drawn on the CPU from the faces' own generators, exactly as the CPU
//! twin draws it ([`draw_noise`]), so both paths see the same numbers and must agree on ŷ_0
//! within rounding (`tests/cuda.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::{cudarc, CudaDevice};
use candle_core::{Device, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use rand::Rng;

use super::{cuda_device, download, function, gpu_err, upload, with_f32_view};
use crate::error::{Error, Result};
use crate::kernels::sampler::{draw_noise, step_constants, FusedCard};
use crate::metrics::SampleStats;

/// Rows of the chain one block runs (the kernel's `MAX_ROWS`).
const MAX_ROWS: usize = 8;
/// Shared memory a block may use without opting in to more.
const SHARED_BYTES: usize = 48 * 1024;
/// Streaming multiprocessors of the largest GPUs; rows per block are chosen so that small
/// batches still spread over about twice this many blocks.
const TARGET_BLOCKS: usize = 264;

/// ε_θ on the GPU, ready to sample. Clones share the weights.
#[derive(Clone)]
pub struct GpuCard {
    dev: CudaDevice,
    card: Arc<FusedCard>,
    w: Arc<Weights>,
    /// card_embed, card_chain, card_summary (compiled and loaded when the sampler is built).
    funcs: Arc<[CudaFunction; 3]>,
    /// Per number of steps: the chain's timesteps and step constants, uploaded once.
    plans: Arc<Mutex<HashMap<usize, Arc<Plan>>>>,
}

/// The timesteps `(steps)` and constants `(steps, 8)` of a chain of some length, on the GPU.
struct Plan {
    ts: CudaSlice<i32>,
    coef: CudaSlice<f32>,
    /// Noise draws (= steps: the prior's and one per step but the last).
    draws: usize,
}

/// The folded weights on the device.
struct Weights {
    we_t: CudaSlice<f32>,
    e_scale: CudaSlice<f32>,
    e_shift: CudaSlice<f32>,
    w1f_t: CudaSlice<f32>,
    w1y_t: CudaSlice<f32>,
    w2_t: CudaSlice<f32>,
    w3_t: CudaSlice<f32>,
    wo: CudaSlice<f32>,
    bo: CudaSlice<f32>,
    /// Per-timestep scale and shift of layers 1–3, `(T, H)` each.
    ab: [CudaSlice<f32>; 6],
}

/// CARD samples ŷ_0 left on the GPU: `rows × C` row-major, each face's samples together.
pub struct DeviceSamples {
    y0: Option<CudaSlice<f32>>,
    pub rows: usize,
    pub classes: usize,
}

impl DeviceSamples {
    /// Host samples `(rows, classes)` copied to `device`'s GPU (to summarise samples drawn
    /// elsewhere, e.g. by the CPU twin in the parity tests).
    pub fn from_host(device: &Device, y0: &[f32], classes: usize) -> Result<Self> {
        let dev = cuda_device(device, "GPU samples")?;
        if classes == 0 || !y0.len().is_multiple_of(classes) {
            return Err(Error::Msg(format!(
                "GPU samples: {} values are not rows of {classes}",
                y0.len()
            )));
        }
        Ok(Self {
            y0: if y0.is_empty() {
                None
            } else {
                Some(upload(dev, y0)?)
            },
            rows: y0.len() / classes,
            classes,
        })
    }
}

/// `(rows, cols)` row-major to `(cols, rows)`.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Threads per block for `h` hidden units: whole warps, at most 256.
fn threads_for(h: usize) -> u32 {
    (h.div_ceil(32) * 32).clamp(32, 256) as u32
}

impl GpuCard {
    /// Uploads the folded sampler `card` to the GPU of `device`.
    pub fn new(card: Arc<FusedCard>, device: &Device) -> Result<Self> {
        let dev = cuda_device(device, "the GPU sampler")?.clone();
        let (c, h, fd) = (card.classes, card.hidden, card.feat_dim);
        let up = |v: &[f32]| upload(&dev, v);
        let w = Weights {
            we_t: up(&transpose(card.image.dense.weight(), h, fd))?,
            e_scale: up(&card.image.scale)?,
            e_shift: up(&card.image.shift)?,
            w1f_t: up(&transpose(card.lin1_f.weight(), h, c))?,
            w1y_t: up(&transpose(card.lin1_y.weight(), h, c))?,
            w2_t: up(&transpose(card.lin2.dense.weight(), h, h))?,
            w3_t: up(&transpose(card.lin3.dense.weight(), h, h))?,
            wo: up(card.out.weight())?,
            bo: up(&card.out_bias)?,
            ab: [
                up(&card.lin1.scale)?,
                up(&card.lin1.shift)?,
                up(&card.lin2.scale)?,
                up(&card.lin2.shift)?,
                up(&card.lin3.scale)?,
                up(&card.lin3.shift)?,
            ],
        };
        let funcs = Arc::new([
            function(&dev, "card_embed")?,
            function(&dev, "card_chain")?,
            function(&dev, "card_summary")?,
        ]);
        Ok(Self {
            dev,
            card,
            w: Arc::new(w),
            funcs,
            plans: Arc::default(),
        })
    }

    /// The chain's plan for `steps` steps, uploaded on first use.
    fn plan(&self, steps: usize) -> Result<Arc<Plan>> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = plans.get(&steps) {
            return Ok(p.clone());
        }
        let pairs = self.card.reverse_steps(steps);
        let ts: Vec<i32> = pairs.iter().map(|&(t, _)| t as i32).collect();
        let coef: Vec<f32> = pairs
            .iter()
            .flat_map(|&(t, prev)| step_constants(&self.card.schedule.step_coeffs(t, prev)))
            .collect();
        let plan = Arc::new(Plan {
            ts: upload(&self.dev, &ts)?,
            coef: upload(&self.dev, &coef)?,
            draws: pairs.len(),
        });
        plans.insert(steps, plan.clone());
        Ok(plan)
    }

    /// Draws `samples` ŷ_0 per row of `features (b, feat_dim)` and f_φ's softmax `f (b, C)`
    /// (both on this GPU) in `steps` steps, one generator per row: the twin of
    /// [`FusedCard::sample`], with the result left on the GPU.
    pub fn draw<R: Rng>(
        &self,
        features: &Tensor,
        f: &Tensor,
        samples: usize,
        steps: usize,
        rngs: &mut [R],
    ) -> Result<DeviceSamples> {
        let card = &self.card;
        let (b, c, h) = (rngs.len(), card.classes, card.hidden);
        if features.dims() != [b, card.feat_dim] || f.dims() != [b, c] {
            return Err(Error::Msg(format!(
                "GPU sampler: features {:?} and f {:?} for {b} generators",
                features.dims(),
                f.dims()
            )));
        }
        let n = b * samples;
        if n == 0 {
            return Ok(DeviceSamples {
                y0: None,
                rows: 0,
                classes: c,
            });
        }
        let plan = self.plan(steps)?;
        let noise = upload(&self.dev, &draw_noise(rngs, samples, plan.draws, c))?;
        let alloc = |len: usize| {
            self.dev
                .alloc_zeros::<f32>(len)
                .map_err(|e| gpu_err("allocating", e))
        };
        let (mut emb, mut fpart, mut y0) = (alloc(b * h)?, alloc(b * h)?, alloc(n * c)?);
        // Rows per block: enough blocks to fill the GPU, within the shared memory.
        let per_row = (2 * h + 2 * c) * std::mem::size_of::<f32>();
        let fit = SHARED_BYTES / per_row;
        if fit == 0 {
            return Err(Error::Msg(format!(
                "GPU sampler: hidden width {h} needs more shared memory than a block has"
            )));
        }
        let rpb = n.div_ceil(TARGET_BLOCKS).clamp(1, MAX_ROWS.min(fit));
        let (fd, ci, hi, steps_i, ni, si, rpbi) = (
            card.feat_dim as i32,
            c as i32,
            h as i32,
            plan.draws as i32,
            n as i32,
            samples as i32,
            rpb as i32,
        );
        let [embed, chain, _] = &*self.funcs;
        let stream = self.dev.cuda_stream();
        let w = &*self.w;
        with_f32_view(features, |feats| {
            with_f32_view(f, |fv| {
                let mut l = stream.launch_builder(embed);
                l.arg(feats)
                    .arg(fv)
                    .arg(&w.we_t)
                    .arg(&w.e_scale)
                    .arg(&w.e_shift);
                l.arg(&w.w1f_t)
                    .arg(&fd)
                    .arg(&ci)
                    .arg(&hi)
                    .arg(&mut emb)
                    .arg(&mut fpart);
                let cfg = LaunchConfig {
                    grid_dim: (b as u32, 1, 1),
                    block_dim: (threads_for(h), 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match card_embed's signature; every buffer holds the
                // b·F, b·C, F·H, H, H, C·H, b·H, b·H floats it reads or writes.
                unsafe { l.launch(cfg) }.map_err(|e| gpu_err("card_embed", e))?;

                let mut l = stream.launch_builder(chain);
                l.arg(&emb).arg(&fpart).arg(fv).arg(&noise);
                l.arg(&w.w1y_t)
                    .arg(&w.w2_t)
                    .arg(&w.w3_t)
                    .arg(&w.wo)
                    .arg(&w.bo);
                for ab in &w.ab {
                    l.arg(ab);
                }
                l.arg(&plan.ts)
                    .arg(&plan.coef)
                    .arg(&steps_i)
                    .arg(&ni)
                    .arg(&si)
                    .arg(&ci)
                    .arg(&hi);
                l.arg(&rpbi).arg(&mut y0);
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(rpb) as u32, 1, 1),
                    block_dim: (threads_for(h), 1, 1),
                    shared_mem_bytes: (rpb * per_row) as u32,
                };
                // SAFETY: the arguments match card_chain's signature; noise holds
                // steps·n·C floats, the weights and scales the sizes uploaded in `new`, y0
                // n·C; rpb ≤ MAX_ROWS and its shared memory fits the block.
                unsafe { l.launch(cfg) }.map_err(|e| gpu_err("card_chain", e))?;
                Ok(())
            })
        })?;
        Ok(DeviceSamples {
            y0: Some(y0),
            rows: n,
            classes: c,
        })
    }

    /// The samples, copied to the host: `(rows, C)` row-major.
    pub fn to_host(&self, s: &DeviceSamples) -> Result<Vec<f32>> {
        match &s.y0 {
            Some(y0) => download(&self.dev, y0),
            None => Ok(Vec::new()),
        }
    }

    /// Per-face statistics of `s` (`per_face` consecutive rows each), each sample's ŷ_0 turned
    /// into probabilities at `temperature`: the twin of
    /// [`crate::model::sample_probs_rows`] followed by [`crate::metrics::sample_stats`].
    pub fn summarise(
        &self,
        s: &DeviceSamples,
        per_face: usize,
        temperature: f64,
    ) -> Result<Vec<SampleStats>> {
        let c = s.classes;
        let Some(y0) = &s.y0 else {
            return Ok(Vec::new());
        };
        if per_face == 0 || !s.rows.is_multiple_of(per_face) {
            return Err(Error::Msg(format!(
                "GPU summary: {} rows are not whole faces of {per_face}",
                s.rows
            )));
        }
        let faces = s.rows / per_face;
        let dev = &self.dev;
        let width = 2 * c + 3;
        let mut probs = dev
            .alloc_zeros::<f32>(s.rows * c)
            .map_err(|e| gpu_err("allocating", e))?;
        let mut out = dev
            .alloc_zeros::<f64>(faces * width)
            .map_err(|e| gpu_err("allocating", e))?;
        let stream = dev.cuda_stream();
        let (fi, si, ci) = (faces as i32, per_face as i32, c as i32);
        let mut l = stream.launch_builder(&self.funcs[2]);
        l.arg(y0).arg(&fi).arg(&si).arg(&ci).arg(&temperature);
        l.arg(&mut probs).arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (faces.div_ceil(64) as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match card_summary's signature; y0 and probs hold faces·S·C
        // floats, out faces·(2C + 3) doubles.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("card_summary", e))?;
        let out = download(dev, &out)?;
        Ok(out
            .chunks_exact(width)
            .map(|o| SampleStats {
                samples: per_face,
                mean: o[..c].iter().map(|&v| v as f32).collect(),
                counts: o[c..2 * c].iter().map(|&k| k as usize).collect(),
                top: (o[2 * c] as usize, o[2 * c + 1] as usize),
                t: o[2 * c + 2],
            })
            .collect())
    }
}
