//! `Classifier`: 48x48 crops in, per-face CARD predictions out. Used by `eval` and the daemon.
//!
//! One encoder pass per crop feeds both f_φ (whose softmax is the CARD prior mean) and the CARD
//! image branch; the sampler then draws S label vectors per face on a strided subset of the
//! training timesteps, and [`crate::metrics::summarize_samples`] turns them into probabilities,
//! votes and the t-test certainty.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use rand::rngs::StdRng;
use serde::Serialize;

pub use crate::config::Tta;
use crate::config::{validate_sampler, ModelConfig, Temperatures};
use crate::error::{Error, Result};
use crate::kernels::sampler::FusedCard;
use crate::kernels::WeightFormat;
use crate::metrics::{sample_stats, SampleStats, SampleSummary};
use crate::model::{load_model_dir, sample_probs_rows, FerModel};
use crate::rngs::keyed_rng;

/// The prediction for one face.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FacePrediction {
    /// CARD summary: mean probabilities, majority label, vote shares, p-value, certain, entropy.
    #[serde(flatten)]
    pub card: SampleSummary,
    /// f_φ's own softmax (the prior mean), for diagnostics and ablations.
    pub fphi_probs: Vec<f32>,
}

impl FacePrediction {
    /// Whether every probability and vote share is finite: a NaN is never an answer (damaged
    /// weights or temperatures make them, and an argmax would read one as the first class).
    pub fn is_finite(&self) -> bool {
        [&self.card.probs, &self.card.votes, &self.fphi_probs]
            .iter()
            .all(|v| v.iter().all(|x| x.is_finite()))
    }
}

/// Sampler settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    pub samples: usize,
    pub steps: usize,
    pub seed: u64,
}

/// Which code draws the CARD samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SamplerKernel {
    /// fer-cam's own kernel: [`FusedCard`] on the CPU, `cuda::GpuCard` on a CUDA GPU (with
    /// the per-face summary there too); the default.
    #[default]
    Fused,
    /// [`FerModel::sample`]: candle ops, the reference.
    Candle,
}

/// The fused sampler for the classifier's device.
#[derive(Clone)]
enum Fused {
    Cpu(Arc<FusedCard>),
    #[cfg(feature = "cuda")]
    Gpu(crate::cuda::GpuCard),
}

/// CARD samples ŷ_0 `(rows, C)`, where the sampler left them.
enum Drawn {
    Host(Vec<f32>),
    #[cfg(feature = "cuda")]
    Gpu(crate::cuda::GpuCard, crate::cuda::DeviceSamples),
}

impl Drawn {
    fn into_host(self) -> Result<Vec<f32>> {
        match self {
            Self::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Self::Gpu(card, s) => card.to_host(&s),
        }
    }
}

/// Encoder + f_φ + CARD sampler, ready to classify crops. Clones share the weights.
#[derive(Clone)]
pub struct Classifier {
    config: ModelConfig,
    model: FerModel,
    device: Device,
    sampler: SamplerConfig,
    /// ε_θ folded for the fused sampler; `None` with [`SamplerKernel::Candle`] (or on a
    /// device without one).
    fused: Option<Fused>,
    /// Key of the next face's noise generator: faces are numbered in the order they are
    /// classified, so results do not depend on how faces were batched.
    next_face: u64,
    tta: Tta,
    origin: ModelOrigin,
}

/// Which model a classifier runs, for the provenance of its outputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelOrigin {
    /// `builtin:NAME` or the model directory.
    pub name: String,
    /// Hex sha256 of the weights file (empty for a model built in memory).
    pub sha256: String,
}

impl Classifier {
    /// Loads a model directory onto `device` with its default sampler settings.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let loaded = load_model_dir(dir, device)?;
        Self::from_loaded(loaded, device)
    }

    fn from_loaded(loaded: crate::model::LoadedModel, device: &Device) -> Result<Self> {
        let mut c = Self::new(loaded.config, loaded.model, device.clone())?;
        c.origin = ModelOrigin {
            name: loaded.dir.display().to_string(),
            sha256: loaded.weights_sha256,
        };
        Ok(c)
    }

    /// Loads the default model compiled into this build ([`crate::model::embedded`]).
    pub fn load_embedded(device: &Device) -> Result<Self> {
        Self::load_builtin(crate::model::embedded::DEFAULT, device)
    }

    /// Loads the built-in model `name` ([`crate::model::embedded::NAMES`]).
    pub fn load_builtin(name: &str, device: &Device) -> Result<Self> {
        let loaded = crate::model::embedded::load(name, device)?;
        Self::from_loaded(loaded, device)
    }

    /// Wraps an already built model (on the CPU, with the fused sampler).
    pub fn new(config: ModelConfig, model: FerModel, device: Device) -> Result<Self> {
        let sampler = SamplerConfig {
            samples: config.card.samples,
            steps: config.card.steps,
            seed: 0,
        };
        let mut c = Self {
            config,
            model,
            device,
            sampler,
            fused: None,
            next_face: 0,
            tta: Tta::None,
            origin: ModelOrigin::default(),
        };
        // The model's own views, checked like any other choice.
        c.set_tta(c.config.input.tta)?;
        c.set_sampler_kernel(SamplerKernel::Fused)?;
        Ok(c)
    }

    /// Chooses the code that draws the samples. [`SamplerKernel::Fused`] runs on the CPU and
    /// on CUDA GPUs; on other devices it leaves the candle path in place.
    pub fn set_sampler_kernel(&mut self, kernel: SamplerKernel) -> Result<()> {
        if kernel == SamplerKernel::Fused && self.fused.is_some() {
            return Ok(()); // already folded
        }
        self.fused = match (kernel, &self.device) {
            (SamplerKernel::Fused, Device::Cpu) => Some(Fused::Cpu(Arc::new(
                self.model.card.fused(self.model.schedule())?,
            ))),
            #[cfg(feature = "cuda")]
            (SamplerKernel::Fused, Device::Cuda(_)) => {
                let card = Arc::new(self.model.card.fused(self.model.schedule())?);
                Some(Fused::Gpu(crate::cuda::GpuCard::new(card, &self.device)?))
            }
            _ => None,
        };
        Ok(())
    }

    pub fn sampler_kernel(&self) -> SamplerKernel {
        if self.fused.is_some() {
            SamplerKernel::Fused
        } else {
            SamplerKernel::Candle
        }
    }

    /// Chooses the test-time views (the model's `input.tta` by default). Ten-crop needs 48x48
    /// inputs.
    pub fn set_tta(&mut self, tta: Tta) -> Result<()> {
        let side = self.config.input.size;
        if tta == Tta::TenCrop && side != crate::data::FACE_SIZE {
            return Err(Error::Config(format!(
                "ten-crop needs 48x48 inputs, the model takes {side}"
            )));
        }
        self.tta = tta;
        Ok(())
    }

    pub fn tta(&self) -> Tta {
        self.tta
    }

    /// The sampler temperatures in use: those calibrated under the chosen views, or the
    /// model's default ones where those views were not calibrated.
    pub fn temperatures(&self) -> Temperatures {
        self.config.temperatures_for(self.tta)
    }

    /// Samples summarised per face: the sampler's, rounded up to whole samples per view.
    pub fn samples_per_face(&self) -> usize {
        self.tta.samples_per_face(self.sampler.samples)
    }

    /// Overrides samples / steps / seed (validated against the model's T).
    pub fn set_sampler(&mut self, sampler: SamplerConfig) -> Result<()> {
        validate_sampler(sampler.samples, sampler.steps, self.config.card.timesteps)?;
        self.sampler = sampler;
        self.next_face = 0;
        Ok(())
    }

    pub fn sampler(&self) -> SamplerConfig {
        self.sampler
    }

    /// Which model this is (name and weights hash).
    pub fn origin(&self) -> &ModelOrigin {
        &self.origin
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Sets how the encoder stores its inference weights ([`WeightFormat`]); clones share it.
    pub fn set_weight_format(&self, format: WeightFormat) {
        self.model.encoder.set_weight_format(format);
    }

    pub fn weight_format(&self) -> WeightFormat {
        self.model.encoder.weight_format()
    }

    pub fn model(&self) -> &FerModel {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of crops in a buffer of `len` bytes (an error unless whole and non-empty).
    fn crop_count(&self, len: usize) -> Result<usize> {
        let side = self.config.input.size;
        let px = side * side;
        if len == 0 || !len.is_multiple_of(px) {
            return Err(Error::Msg(format!(
                "crop buffer of {len} bytes is not a whole number of {side}x{side} images"
            )));
        }
        Ok(len / px)
    }

    /// Per-face statistics of the samples `(n, s, C)`: on the GPU where they were drawn there,
    /// else from [`sample_probs_rows`] and [`sample_stats`].
    fn stats(&self, drawn: Drawn, s: usize) -> Result<Vec<SampleStats>> {
        let c = self.config.num_classes();
        let temperature = self.temperatures().sample;
        match drawn {
            Drawn::Host(y0) => Ok(sample_probs_rows(&y0, c, temperature)
                .chunks_exact((s * c).max(1))
                .map(|face| sample_stats(face, c))
                .collect()),
            #[cfg(feature = "cuda")]
            Drawn::Gpu(card, d) => card.summarise(&d, s, temperature),
        }
    }

    /// Predictions from per-face sample statistics and f_φ's probabilities.
    fn summarize(&self, stats: Vec<SampleStats>, fphi: Vec<Vec<f32>>) -> Vec<FacePrediction> {
        let t = self.temperatures().output;
        let alpha = self.config.card.alpha;
        stats
            .into_iter()
            .zip(fphi)
            .map(|(st, fphi_probs)| FacePrediction {
                card: st.summary(alpha).tempered(t),
                fphi_probs,
            })
            .collect()
    }

    /// Normalised input tensor `(n, 1, S, S)` from `n` row-major gray crops of side S.
    pub fn preprocess(&self, crops: &[u8]) -> Result<Tensor> {
        let side = self.config.input.size;
        let n = self.crop_count(crops.len())?;
        let mut data = Vec::with_capacity(crops.len());
        for crop in crops.chunks_exact(side * side) {
            self.config.input.normalise_into(crop, &mut data);
        }
        Ok(Tensor::from_vec(data, (n, 1, side, side), &self.device)?)
    }

    /// Classifies `n` crops given as `n·S·S` bytes. Returns one prediction per crop, in order.
    pub fn predict(&mut self, crops: &[u8]) -> Result<Vec<FacePrediction>> {
        let n = self.crop_count(crops.len())?;
        let (f, drawn) = self.fphi_and_samples(crops)?;
        let stats = self.stats(drawn, self.samples_per_face())?;
        let fphi = self.mean_over_views(&f, n)?.to_vec2::<f32>()?;
        Ok(self.summarize(stats, fphi))
    }

    /// The raw CARD samples ŷ_0 of `n` crops under the chosen views, as
    /// `(n, samples_per_face, C)` values in one flat vector: what calibration fits the
    /// temperatures on.
    pub fn sample_y0(&mut self, crops: &[u8]) -> Result<Vec<f32>> {
        self.fphi_and_samples(crops)?.1.into_host()
    }

    /// f_φ's probabilities of `n` crops, averaged over the chosen views: `(n, C)` flat, no
    /// sampling (what a distilled student learns from).
    pub fn fphi_probs(&self, crops: &[u8]) -> Result<Vec<f32>> {
        let n = self.crop_count(crops.len())?;
        let (_, f) = self.features_and_view_probs(crops)?;
        Ok(self
            .mean_over_views(&f, n)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// Per-view rows `(n·V, C)`, each face's views together, averaged per face: `(n, C)`.
    fn mean_over_views(&self, f: &Tensor, n: usize) -> Result<Tensor> {
        let c = self.config.num_classes();
        Ok(f.reshape((n, self.tta.views(), c))?.mean(1)?)
    }

    /// Encoder features and f_φ's probabilities of every view of `n` crops, `n·V` rows with
    /// each face's views together.
    fn features_and_view_probs(&self, crops: &[u8]) -> Result<(Tensor, Tensor)> {
        let xs = self.preprocess(&self.views(crops)?)?;
        let feats = self.model.features(&xs, false)?;
        let f = candle_nn::ops::softmax(&self.model.head_logits(&feats)?, D::Minus1)?;
        Ok((feats, f))
    }

    /// The views of `n` crops, `n·V` crops with each face's views together.
    fn views(&self, crops: &[u8]) -> Result<Vec<u8>> {
        Ok(crate::data::augment::test_views(
            self.tta,
            crops,
            self.config.input.size,
        ))
    }

    /// f_φ's probabilities `(n·V, C)` per view and the CARD samples ŷ_0
    /// `(n, samples_per_face, C)` (flat) of `n` crops. Without views each face draws from the
    /// generator keyed (seed, face); with views, view v from (seed, face, 1 + v).
    fn fphi_and_samples(&mut self, crops: &[u8]) -> Result<(Tensor, Drawn)> {
        let n = self.crop_count(crops.len())?;
        let views = self.tta.views();
        let (feats, f) = self.features_and_view_probs(crops)?;
        let mut rngs: Vec<StdRng> = if views == 1 {
            self.face_keys(n)
                .map(|(seed, face)| keyed_rng(&[seed, face]))
                .collect()
        } else {
            self.face_keys(n)
                .flat_map(|(seed, face)| {
                    (0..views as u64).map(move |v| keyed_rng(&[seed, face, 1 + v]))
                })
                .collect()
        };
        // (n·V, S/V, C) row-major is (n, S, C): each face's views in a row.
        let per_view = self.samples_per_face() / views;
        let y0 = self.draw(&feats, &f, per_view, &mut rngs)?;
        Ok((f, y0))
    }

    /// `samples` ŷ_0 per row of `feats` / `f` (one generator each), `(rows, samples, C)`,
    /// from the fused kernel or the candle reference.
    fn draw(
        &self,
        feats: &Tensor,
        f: &Tensor,
        samples: usize,
        rngs: &mut [StdRng],
    ) -> Result<Drawn> {
        let steps = self.sampler.steps;
        Ok(match &self.fused {
            Some(Fused::Cpu(fused)) => {
                let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                Drawn::Host(fused.sample(&flat(feats)?, &flat(f)?, samples, steps, rngs))
            }
            #[cfg(feature = "cuda")]
            Some(Fused::Gpu(card)) => {
                Drawn::Gpu(card.clone(), card.draw(feats, f, samples, steps, rngs)?)
            }
            None => Drawn::Host(
                self.model
                    .sample(feats, f, samples, steps, rngs)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
        })
    }

    /// (seed, face number) of the next `n` faces, which are then taken.
    fn face_keys(&mut self, n: usize) -> impl Iterator<Item = (u64, u64)> {
        let (seed, first) = (self.sampler.seed, self.next_face);
        self.next_face += n as u64;
        (first..first + n as u64).map(move |face| (seed, face))
    }
}
