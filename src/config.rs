//! Model configuration: what `config.json` in a model directory holds. Every field has a default
//! and [`ModelConfig::validate`] checks ranges before any tensor is built.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::{ConvKernels, WeightFormat};

/// The model directory format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The architecture name `config.json` records for a model with CBAM in its blocks.
pub const ARCH: &str = "resnet18-cbam-card";

/// The architecture name `config.json` records for a model without CBAM. Files written before
/// the name followed the encoder say [`ARCH`] for these too; they still load.
pub const ARCH_NO_CBAM: &str = "resnet18-card";

/// The architecture name for an encoder with (`cbam`) or without CBAM.
pub fn arch_name(cbam: bool) -> &'static str {
    if cbam {
        ARCH
    } else {
        ARCH_NO_CBAM
    }
}
/// FER2013's classes in label order (0..=6).
pub const FER2013_CLASSES: [&str; 7] = [
    "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral",
];

/// A class name in the form fer-cam compares names in: trimmed, lower case, and the usual
/// synonyms of the basic emotions folded onto FER2013's names (`happiness` → `happy`, `anger` →
/// `angry`, …), so that any model can be scored on any label set by name.
pub fn canonical_class(name: &str) -> String {
    let lower = name.trim().to_lowercase();
    let folded = match lower.as_str() {
        "anger" | "angered" => "angry",
        "disgusted" => "disgust",
        "fearful" | "afraid" | "scared" => "fear",
        "happiness" | "joy" | "happy" => "happy",
        "sadness" | "sad" => "sad",
        "surprised" => "surprise",
        "neutrality" => "neutral",
        "contemptuous" => "contempt",
        other => other,
    };
    folded.to_string()
}

/// The encoder's first layer. It sets both accuracy and real-time cost, so it is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 3x3 stride-1 conv, no max-pool: full 48x48 resolution into layer1 (strong FER2013 baselines).
    #[default]
    Conv3x3,
    /// 7x7 stride-2 conv + 3x3 stride-2 max-pool: 12x12 into layer1, ~10x cheaper.
    Conv7x7Pool,
    /// 3x3 stride-2 conv, no max-pool: 24x24 into layer1, ~4x cheaper than `conv3x3`.
    Conv3x3S2,
}

impl Stem {
    /// The name `--stem` and `config.json` use.
    pub fn name(self) -> &'static str {
        match self {
            Stem::Conv3x3 => "conv3x3",
            Stem::Conv7x7Pool => "conv7x7_pool",
            Stem::Conv3x3S2 => "conv3x3_s2",
        }
    }

    /// Whether the two stems hold weights of the same shapes: the 3x3 stems differ only in
    /// stride, so an encoder trained with one can start training with the other.
    pub fn same_weights(self, other: Stem) -> bool {
        let conv3x3 = |s| matches!(s, Stem::Conv3x3 | Stem::Conv3x3S2);
        self == other || (conv3x3(self) && conv3x3(other))
    }
}

impl std::str::FromStr for Stem {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "conv3x3" => Ok(Stem::Conv3x3),
            "conv7x7_pool" | "conv7x7-pool" => Ok(Stem::Conv7x7Pool),
            "conv3x3_s2" | "conv3x3-s2" => Ok(Stem::Conv3x3S2),
            _ => Err(Error::Config(format!(
                "stem {s:?} is unknown (allowed: conv3x3, conv3x3_s2, conv7x7_pool)"
            ))),
        }
    }
}

/// ResNet18 + CBAM encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    pub stem: Stem,
    /// CBAM attention in every residual block.
    pub cbam: bool,
    /// CBAM channel-MLP reduction ratio (16 in the paper).
    pub cbam_reduction: usize,
    /// Stage widths (64-128-256-512 for ResNet18).
    pub widths: [usize; 4],
    /// BasicBlocks per stage (`[2, 2, 2, 2]` for ResNet18).
    pub blocks: [usize; 4],
    /// Convolution implementation: a run-time choice, not part of the saved model.
    #[serde(skip)]
    pub kernels: ConvKernels,
    /// How inference stores the convolution weights: a run-time choice too.
    #[serde(skip)]
    pub weights: WeightFormat,
}

impl EncoderConfig {
    /// Whether `other`'s weights load into this encoder: the same network but for the stem's
    /// stride (`classifier.init` may move a model from `conv3x3_s2` to `conv3x3`).
    pub fn loads_weights_of(&self, other: &EncoderConfig) -> bool {
        self.stem.same_weights(other.stem)
            && EncoderConfig {
                stem: self.stem,
                ..other.clone()
            } == *self
    }
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            stem: Stem::Conv3x3,
            cbam: true,
            cbam_reduction: 16,
            widths: [64, 128, 256, 512],
            blocks: [2, 2, 2, 2],
            kernels: ConvKernels::Fast,
            weights: WeightFormat::F32,
        }
    }
}

/// Test-time augmentation: the views of each face that the encoder sees. f_φ's probabilities
/// are averaged over the views and CARD's samples are pooled across them (⌈S/V⌉ per view), so
/// the calibrated temperatures belong to one choice of views.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum Tta {
    /// The crop as it is.
    #[default]
    None,
    /// The crop and its mirror image.
    Flip,
    /// The four corner and the centre 44-px crops (resized back to the input size) and their
    /// mirror images.
    TenCrop,
}

impl Tta {
    /// Views per face.
    pub fn views(self) -> usize {
        match self {
            Tta::None => 1,
            Tta::Flip => 2,
            Tta::TenCrop => 10,
        }
    }

    /// Samples actually drawn per face when `samples` are asked for: whole samples per view.
    pub fn samples_per_face(self, samples: usize) -> usize {
        let v = self.views();
        v * samples.div_ceil(v)
    }

    /// The name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Tta::None => "none",
            Tta::Flip => "flip",
            Tta::TenCrop => "ten-crop",
        }
    }
}

/// Input crop geometry and normalisation: `x = (pixel/255 − mean)/std`, or per crop (see
/// [`Norm`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    pub size: usize,
    pub mean: f32,
    pub std: f32,
    /// Whether `mean` and `std` are fixed or each crop's own (absent from a model file: fixed).
    #[serde(skip_serializing_if = "Norm::is_fixed")]
    pub norm: Norm,
    /// Default test-time views of `eval` and `run` (and those `calibrate` fitted the
    /// temperatures under).
    pub tta: Tta,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            size: 48,
            mean: 0.5,
            std: 0.25,
            norm: Norm::Fixed,
            tta: Tta::None,
        }
    }
}

/// How a crop's gray levels become the network's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// `x = (pixel/255 − mean)/std` with the config's `mean` and `std`.
    #[default]
    Fixed,
    /// `x = (pixel − m)/max(s, 1)` with `m` and `s` the crop's own mean and standard deviation
    /// in gray levels: a camera's gain and a brightness shift of the face leave its input as
    /// it was (up to clipped pixels); the config's `mean` and `std` are not used.
    PerCrop,
}

impl Norm {
    fn is_fixed(&self) -> bool {
        *self == Norm::Fixed
    }
}

impl InputConfig {
    /// Appends the network input of one crop's gray levels to `out`.
    pub fn normalise_into(&self, px: &[u8], out: &mut Vec<f32>) {
        match self.norm {
            Norm::Fixed => {
                let (mean, std) = (self.mean, self.std);
                out.extend(px.iter().map(|&p| (p as f32 / 255.0 - mean) / std));
            }
            Norm::PerCrop => {
                let n = px.len().max(1) as f64;
                let m = px.iter().map(|&p| p as f64).sum::<f64>() / n;
                let var = px.iter().map(|&p| (p as f64 - m).powi(2)).sum::<f64>() / n;
                let (m, s) = (m as f32, var.sqrt().max(1.0) as f32);
                out.extend(px.iter().map(|&p| (p as f32 - m) / s));
            }
        }
    }
}

/// CARD diffusion head and its default sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CardConfig {
    /// Hidden width of the noise network.
    pub hidden: usize,
    /// Training timesteps T.
    pub timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// Default samples per image.
    pub samples: usize,
    /// Default sampling steps (a strided subset of the T training steps when fewer).
    pub steps: usize,
    /// Softmax temperature τ turning `−(ŷ_0 − 1)²` into per-sample probabilities (what the votes
    /// and the t-test read).
    pub temperature: f64,
    /// Temperature T of the reported probabilities: the mean of the per-sample probabilities,
    /// raised to 1/T and renormalised ([`crate::metrics::temper`]). 1 reports the plain mean.
    pub output_temperature: f64,
    /// Significance level of the CARD paired t-test for the certain flag.
    pub alpha: f64,
    /// Temperatures fitted under test-time views other than the model's default
    /// (`input.tta`, whose temperatures are `temperature` / `output_temperature`), so that a
    /// run with other views (`--tta`) gets its own; views missing here fall back to the default
    /// temperatures. See [`ModelConfig::temperatures_for`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub calibrated: BTreeMap<Tta, Temperatures>,
}

impl Default for CardConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            timesteps: 10,
            beta_start: 0.01,
            beta_end: 0.95,
            samples: 32,
            steps: 10,
            temperature: 1.0,
            output_temperature: 1.0,
            alpha: 0.05,
            calibrated: BTreeMap::new(),
        }
    }
}

/// The sampler's two temperatures ([`CardConfig::temperature`] and
/// [`CardConfig::output_temperature`]), as `fer-cam calibrate` fits them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Temperatures {
    /// τ: per-sample softmax temperature.
    pub sample: f64,
    /// T: temperature of the reported mean probabilities.
    pub output: f64,
}

/// The per-sample temperatures τ a model may carry: what `calibrate` searches. Far below, the
/// sampler's probabilities overflow into NaN (τ = 5e-324); far above, every class looks alike.
pub const TAU_RANGE: (f64, f64) = (1e-3, 1e3);
/// The output temperatures T a model may carry (`calibrate`'s search range).
pub const OUTPUT_RANGE: (f64, f64) = (0.05, 20.0);

impl Temperatures {
    /// τ within [`TAU_RANGE`] and T within [`OUTPUT_RANGE`] (so neither is NaN or infinite).
    pub fn is_valid(&self) -> bool {
        (TAU_RANGE.0..=TAU_RANGE.1).contains(&self.sample)
            && (OUTPUT_RANGE.0..=OUTPUT_RANGE.1).contains(&self.output)
    }
}

/// What `fer-cam calibrate` fits and `export` writes into a model: the temperatures and the
/// test-time views they were fitted under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub temperatures: Temperatures,
    pub tta: Tta,
}

impl CardConfig {
    pub fn temperatures(&self) -> Temperatures {
        Temperatures {
            sample: self.temperature,
            output: self.output_temperature,
        }
    }

    pub fn set_temperatures(&mut self, t: Temperatures) {
        self.temperature = t.sample;
        self.output_temperature = t.output;
    }
}

/// Everything needed to rebuild a model from its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub format_version: u32,
    pub arch: String,
    /// Class names in output order.
    pub classes: Vec<String>,
    #[serde(default)]
    pub encoder: EncoderConfig,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub card: CardConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            format_version: FORMAT_VERSION,
            arch: arch_name(EncoderConfig::default().cbam).to_string(),
            classes: FER2013_CLASSES.iter().map(|s| s.to_string()).collect(),
            encoder: EncoderConfig::default(),
            input: InputConfig::default(),
            card: CardConfig::default(),
        }
    }
}

fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Config(msg()))
    }
}

impl ModelConfig {
    /// The sampler temperatures under the test-time views `tta`: the default ones for the
    /// model's default views, those calibrated under `tta` for others, and the default ones
    /// where `tta` was not calibrated.
    pub fn temperatures_for(&self, tta: Tta) -> Temperatures {
        match self.card.calibrated.get(&tta) {
            Some(t) if tta != self.input.tta => *t,
            _ => self.card.temperatures(),
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Checks every field; the message names the field, its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        check(self.format_version == FORMAT_VERSION, || {
            format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            )
        })?;
        let named = arch_name(self.encoder.cbam);
        // A model without CBAM from before the name followed the encoder says ARCH.
        check(self.arch == named || self.arch == ARCH, || {
            format!(
                "arch {:?} does not match the encoder (expected {named:?}, as encoder.cbam is {})",
                self.arch, self.encoder.cbam
            )
        })?;
        check((2..=1000).contains(&self.classes.len()), || {
            format!(
                "classes has {} names (allowed 2..=1000)",
                self.classes.len()
            )
        })?;
        for (i, c) in self.classes.iter().enumerate() {
            check(!c.trim().is_empty(), || {
                format!("class {i} has an empty name")
            })?;
            // A class name reaches terminals, JSON, CSV, SVG and file names: printable text of
            // a sane length only.
            check(
                !c.chars().any(char::is_control) && c.chars().count() <= 64,
                || {
                    format!(
                        "class name {c:?} (at most 64 characters, none of them control characters)"
                    )
                },
            )?;
            check(!self.classes[..i].contains(c), || {
                format!("class name {c:?} appears twice")
            })?;
        }
        let e = &self.encoder;
        check(e.widths.iter().all(|&w| (1..=4096).contains(&w)), || {
            format!("encoder.widths {:?} (each allowed 1..=4096)", e.widths)
        })?;
        check(e.blocks.iter().all(|&b| (1..=16).contains(&b)), || {
            format!("encoder.blocks {:?} (each allowed 1..=16)", e.blocks)
        })?;
        check((1..=256).contains(&e.cbam_reduction), || {
            format!(
                "encoder.cbam_reduction {} (allowed 1..=256)",
                e.cbam_reduction
            )
        })?;
        let i = &self.input;
        check((16..=256).contains(&i.size), || {
            format!("input.size {} (allowed 16..=256)", i.size)
        })?;
        check(i.std.is_finite() && i.std > 0.0, || {
            format!("input.std {} (must be > 0)", i.std)
        })?;
        check(i.mean.is_finite(), || {
            format!("input.mean {} is not finite", i.mean)
        })?;
        let c = &self.card;
        check((1..=65536).contains(&c.hidden), || {
            format!("card.hidden {} (allowed 1..=65536)", c.hidden)
        })?;
        check((1..=10000).contains(&c.timesteps), || {
            format!("card.timesteps {} (allowed 1..=10000)", c.timesteps)
        })?;
        check(
            c.beta_start > 0.0 && c.beta_start <= c.beta_end && c.beta_end < 1.0,
            || {
                format!(
                    "card betas {}..{} (need 0 < beta_start <= beta_end < 1)",
                    c.beta_start, c.beta_end
                )
            },
        )?;
        validate_sampler(c.samples, c.steps, c.timesteps)?;
        check(c.temperatures().is_valid(), || {
            format!(
                "card.temperature {} and card.output_temperature {} (allowed {}..={} and {}..={})",
                c.temperature,
                c.output_temperature,
                TAU_RANGE.0,
                TAU_RANGE.1,
                OUTPUT_RANGE.0,
                OUTPUT_RANGE.1
            )
        })?;
        // The default views' temperatures have one place: `temperature` / `output_temperature`.
        check(!c.calibrated.contains_key(&self.input.tta), || {
            format!(
                "card.calibrated.{0}: {0} is the default views (input.tta), whose temperatures \
                 are card.temperature and card.output_temperature",
                self.input.tta.name()
            )
        })?;
        for (tta, t) in &c.calibrated {
            check(t.is_valid(), || {
                format!(
                    "card.calibrated.{}: temperatures {} and {} (allowed {:?} and {:?})",
                    tta.name(),
                    t.sample,
                    t.output,
                    TAU_RANGE,
                    OUTPUT_RANGE
                )
            })?;
        }
        check(c.alpha > 0.0 && c.alpha < 1.0, || {
            format!("card.alpha {} (allowed 0 < alpha < 1)", c.alpha)
        })?;
        // Each value can be in range while together they ask for gigabytes: bound the total
        // before any tensor is allocated.
        let params = self.parameter_bound();
        check(params <= MAX_PARAMETERS, || {
            format!(
                "the model would have up to {:.0} M parameters (widths {:?}, blocks {:?}, \
                 card.hidden {}, card.timesteps {}); at most {} M are accepted",
                params / 1e6,
                e.widths,
                e.blocks,
                c.hidden,
                c.timesteps,
                MAX_PARAMETERS / 1e6
            )
        })
    }

    /// An upper bound on the number of parameters this config builds (encoder, head, CARD net),
    /// from the layer shapes alone; computed in f64 so that no product overflows.
    pub fn parameter_bound(&self) -> f64 {
        let e = &self.encoder;
        let (classes, hidden, t) = (
            self.classes.len() as f64,
            self.card.hidden as f64,
            self.card.timesteps as f64,
        );
        let mut total = 49.0 * e.widths[0] as f64;
        let mut prev = e.widths[0] as f64;
        for (&w, &b) in e.widths.iter().zip(&e.blocks) {
            let w = w as f64;
            // Per block two 3x3 convs, CBAM's MLP and 7x7 gate, batch norms; plus the stage's
            // first conv and downsample from the previous width.
            total += b as f64 * (18.0 * w * w + 2.0 * w * w + 10.0 * w + 98.0) + 10.0 * prev * w;
            prev = w;
        }
        total += prev * classes + classes;
        total += prev * hidden + 2.0 * classes * hidden + 2.0 * hidden * hidden;
        total += 3.0 * t * hidden + hidden * classes + 20.0 * hidden;
        total
    }
}

/// Most parameters a model config may ask for (1.6 GB as f32); the shipped model has ~3 M.
pub const MAX_PARAMETERS: f64 = 400e6;

/// Checks a sampler override: `samples` in 1..=4096, `steps` in 1..=T.
pub fn validate_sampler(samples: usize, steps: usize, timesteps: usize) -> Result<()> {
    check((1..=4096).contains(&samples), || {
        format!("samples {samples} (allowed 1..=4096)")
    })?;
    let least = min_steps(timesteps);
    check((least..=timesteps).contains(&steps), || {
        format!(
            "steps {steps} (allowed {least}..={timesteps}: at most the model's training \
             timesteps, and at least {least}: in fewer steps the chain's first estimate of the \
             label, made at the noisiest step, is not corrected in time)"
        )
    })
}

/// The fewest sampling steps accepted: 4 (or T, when the model has fewer timesteps). Measured
/// on the built-in model (T = 10, 1,000 PublicTest images, f_φ 66.1%): the CARD vote scores
/// 12.4%, 2.2%, 43.0%, 64.6% and 66.1% in 1 to 5 steps, 65.1% in 10.
pub fn min_steps(timesteps: usize) -> usize {
    timesteps.clamp(1, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_crop_input_ignores_gain_and_brightness_and_fixed_keeps_its_formula() {
        let face: Vec<u8> = (0..48 * 48).map(|i| (40 + (i * 7) % 150) as u8).collect();
        let fixed = InputConfig::default();
        let mut x = Vec::new();
        fixed.normalise_into(&face, &mut x);
        assert_eq!(x[1], (face[1] as f32 / 255.0 - 0.5) / 0.25);
        // Darker and with less contrast, as under a camera's lower gain: a different input
        // when fixed, the same one per crop (up to the rounding of the gray levels).
        let dim: Vec<u8> = face
            .iter()
            .map(|&p| (p as f32 * 0.7 + 10.0) as u8)
            .collect();
        let mut x_dim = Vec::new();
        fixed.normalise_into(&dim, &mut x_dim);
        assert!(x.iter().zip(&x_dim).any(|(a, b)| (a - b).abs() > 0.1));
        let per_crop = InputConfig {
            norm: Norm::PerCrop,
            ..InputConfig::default()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        per_crop.normalise_into(&face, &mut a);
        per_crop.normalise_into(&dim, &mut b);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "{mean} {var}"
        );
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(worst < 0.05, "{worst}");
        // A flat crop has no contrast to scale: all zeros, nothing infinite.
        let mut flat = Vec::new();
        per_crop.normalise_into(&[77; 48 * 48], &mut flat);
        assert!(flat.iter().all(|&v| v == 0.0));
        // Model files without the field read as fixed, and fixed is not written.
        let json = serde_json::to_string(&fixed).unwrap();
        assert!(!json.contains("norm"), "{json}");
        let back: InputConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.norm, Norm::Fixed);
        let json = serde_json::to_string(&per_crop).unwrap();
        assert!(json.contains("\"norm\":\"per_crop\""), "{json}");
    }

    #[test]
    fn init_may_change_only_a_3x3_stems_stride() {
        let s2 = EncoderConfig {
            stem: Stem::Conv3x3S2,
            ..EncoderConfig::default()
        };
        let s1 = EncoderConfig::default();
        assert!(s1.loads_weights_of(&s2) && s2.loads_weights_of(&s1));
        let pool = EncoderConfig {
            stem: Stem::Conv7x7Pool,
            ..EncoderConfig::default()
        };
        assert!(!pool.loads_weights_of(&s1) && !s2.loads_weights_of(&pool));
        let narrow = EncoderConfig {
            widths: [32, 64, 128, 256],
            ..s2.clone()
        };
        assert!(!s1.loads_weights_of(&narrow));
        let no_cbam = EncoderConfig {
            cbam: false,
            ..s2.clone()
        };
        assert!(!s1.loads_weights_of(&no_cbam) && no_cbam.loads_weights_of(&no_cbam));
    }

    #[test]
    fn temperatures_that_would_make_nan_answers_are_refused() {
        let mut cfg = ModelConfig::default();
        cfg.validate().unwrap();
        for (tau, t) in [
            (5e-324, 1.0),
            (1.0, 1e300),
            (f64::NAN, 1.0),
            (1e-4, 1.0),
            (1.0, 0.0),
        ] {
            cfg.card.temperature = tau;
            cfg.card.output_temperature = t;
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains("card.temperature"), "{tau} {t}: {e}");
        }
        cfg.card.temperature = 0.142;
        cfg.card.output_temperature = 1.51;
        cfg.validate().unwrap();
    }

    /// `arch` says whether the encoder has CBAM; a CBAM-less model from before the name
    /// followed the encoder (`resnet18-cbam-card`) still loads, a CBAM model called
    /// `resnet18-card` does not.
    #[test]
    fn arch_names_what_the_encoder_holds() {
        let mut c = ModelConfig::default();
        c.encoder.cbam = true;
        c.arch = arch_name(true).into();
        c.validate().unwrap();
        c.arch = ARCH_NO_CBAM.into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("does not match the encoder"), "{e}");
        c.encoder.cbam = false;
        c.validate().unwrap();
        c.arch = ARCH.into();
        c.validate().unwrap();
        c.arch = "vgg13".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn default_config_is_valid_and_round_trips() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        let s = serde_json::to_string_pretty(&c).unwrap();
        let back: ModelConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        assert!(s.contains("\"stem\": \"conv3x3\""));
    }

    #[test]
    fn in_range_values_that_imply_huge_tensors_are_refused() {
        let mut c = ModelConfig::default();
        let ok = c.parameter_bound();
        assert!(ok > 11e6 && ok < 30e6, "{ok}");
        c.card.hidden = 65536;
        c.card.timesteps = 10000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("M parameters"), "{e}");
        let mut c = ModelConfig::default();
        c.encoder.widths = [4096; 4];
        c.encoder.blocks = [16; 4];
        assert!(c.validate().is_err());
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = ModelConfig::default();
        c.card.steps = 11;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("steps 11") && e.contains("4..=10"), "{e}");
        // Too few steps for the chain to correct its first estimate: refused, not answered.
        for steps in [1, 2, 3] {
            let mut c = ModelConfig::default();
            c.card.steps = steps;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("steps {steps}")), "{e}");
        }
        assert_eq!((min_steps(10), min_steps(1), min_steps(1000)), (4, 1, 4));
        let mut c = ModelConfig::default();
        c.classes[1] = "angry".into();
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        for bad in [
            "a\nerror: forged",
            "\u{1b}[2Jclear",
            "x\u{7}",
            &"long".repeat(20),
        ] {
            let mut c = ModelConfig::default();
            c.classes[1] = bad.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("control characters") && !e.contains('\n'), "{e}");
        }
        let mut c = ModelConfig::default();
        c.card.beta_end = 1.0;
        assert!(c.validate().is_err());
        assert!("conv5x5".parse::<Stem>().is_err());
        assert_eq!("conv7x7_pool".parse::<Stem>().unwrap(), Stem::Conv7x7Pool);
        for stem in [Stem::Conv3x3, Stem::Conv7x7Pool, Stem::Conv3x3S2] {
            assert_eq!(stem.name().parse::<Stem>().unwrap(), stem);
            assert_eq!(
                serde_json::to_string(&stem).unwrap(),
                format!("\"{}\"", stem.name())
            );
        }
    }
}
