//! Training configuration: what `--config FILE` holds and every checkpoint records.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, Tta};
use crate::data::augment::{Augment, Webcam};
use crate::error::{Error, Result};
use crate::kernels::precision::Precision;
use crate::model::export::StoredWeights;

/// One stage's optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub augment: Augment,
}

/// Barlow Twins settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    #[serde(flatten)]
    pub opt: StageConfig,
    /// Projector widths (the last is the embedding size).
    pub projector: Vec<usize>,
    pub lambda: f64,
    /// Extra unlabeled image folders (any layout; labels ignored).
    #[serde(default)]
    pub extra_images: Vec<PathBuf>,
    /// Training images the features' kNN probe compares PublicTest with after each epoch
    /// (evenly spaced over Training; 0: no probe). It reports how well the features alone
    /// separate the classes, and selects nothing.
    #[serde(default = "default_knn_references")]
    pub knn_references: usize,
}

fn default_knn_references() -> usize {
    5000
}

/// Supervised f_φ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    #[serde(flatten)]
    pub opt: StageConfig,
    pub label_smoothing: f64,
    /// What f_φ learns from: the label, the votes' distribution, or a label drawn from it.
    #[serde(default)]
    pub targets: Targets,
    /// With `targets: votes`, the share of the target given to the single annotator's label
    /// (FER2013's own label under FER+ votes), in [0, 1].
    #[serde(default)]
    pub single_label_weight: f64,
    /// A model directory whose encoder starts this stage instead of the SSL stage's (which
    /// `train all` then skips): a fine-tune of a trained model on other labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Learn also from a trained model's probabilities (knowledge distillation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// Mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself, images
    /// and targets alike, `λ·a + (1 − λ)·b` with one λ per batch drawn from Beta(α, α); this is
    /// α (0, the default: off).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mixup: f64,
    /// Stability training: each image's augmented view is seen a second time through camera
    /// conditions, and f_φ's answer on that copy learns to match its answer on the first (off
    /// unless set; see [`Consistency`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Which epoch's weights the stage keeps as its model (the best on PublicTest, the default,
    /// or the last).
    #[serde(default, skip_serializing_if = "Keep::is_best")]
    pub keep: Keep,
}

/// Stability training (Zheng et al., CVPR 2016) against what a camera and the face stage do to
/// a face. Each batch image's augmented view `x` also passes through `webcam` (re-framing, a
/// lower resolution, blur, noise, gamma) as `x'`, and the loss gains
/// `weight · KL(p(x) ‖ p(x'))` with `p(x)` held fixed: f_φ keeps learning its targets from `x`
/// alone, and learns to give `x'` the answer it gives `x`. Each step costs two images' passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consistency {
    /// The KL term's weight (> 0).
    pub weight: f64,
    /// The conditions the second copy goes through (at least one on).
    pub webcam: Webcam,
}

/// Which epoch's weights a supervised stage keeps as its model. Every epoch is scored on
/// PublicTest either way (the log and `metrics.jsonl` have each score).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The epoch whose f_φ scores best on PublicTest (one view).
    #[default]
    Best,
    /// The last epoch's, the end of the cosine schedule, whatever PublicTest says of the epochs
    /// before: one view's score of each epoch then chooses nothing (a stage resumed with `last`
    /// after it finished choosing `best` rewrites its model from the last epoch).
    Last,
}

impl Keep {
    fn is_best(&self) -> bool {
        *self == Keep::Best
    }
}

/// Distillation from a teacher: f_φ's target for each Training image becomes
/// `(1 − weight) · smoothed one-hot label + weight · teacher probabilities`, the teacher's f_φ
/// probabilities averaged over its test-time views of the un-augmented image, computed once
/// before the first epoch. With `also`, the teacher is an ensemble: the mean of every listed
/// model's probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher's model directory (same classes, 48x48 input).
    pub teacher: PathBuf,
    /// More teachers (same classes, 48x48 input, any encoder) whose probabilities are averaged
    /// with `teacher`'s, each model weighing the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<PathBuf>,
    /// The teacher's test-time views.
    pub tta: Tta,
    /// Share of the target taken from the teacher, in [0, 1].
    pub weight: f64,
}

impl DistillConfig {
    /// `teacher` under its ten-crop views, taking 0.6 of the target.
    pub fn new(teacher: PathBuf) -> Self {
        Self {
            teacher,
            also: Vec::new(),
            tta: Tta::TenCrop,
            weight: 0.6,
        }
    }

    /// Every teacher's model directory: `teacher`, then `also`.
    pub fn teachers(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.teacher).chain(&self.also)
    }
}

/// f_φ's training targets. With single-label data all three are the (smoothed) one-hot label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// The label (the majority under crowd votes), one-hot, smoothed.
    #[default]
    Label,
    /// The distribution of the votes (cross-entropy against it), mixed with the single
    /// annotator's label by `single_label_weight`, smoothed.
    Votes,
    /// Each epoch, one label drawn per image from the votes' distribution (Barsoum et al.'s
    /// "probabilistic label drawing"), one-hot, smoothed.
    Draw,
}

/// CARD's y_0 during training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardY0 {
    /// The one-hot label (the CARD reference).
    #[default]
    OneHot,
    /// The classifier's vote target without smoothing (the votes' distribution mixed with the
    /// single label); the one-hot label on single-label data.
    Votes,
}

/// CARD ε_θ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardTrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Samples per image when scoring PublicTest after each epoch.
    pub val_samples: usize,
    /// The label vector y_0 the forward process starts from.
    #[serde(default)]
    pub y0: CardY0,
    /// Share of the encoder features zeroed (the rest scaled by 1/(1 − p)) in each training
    /// row ε_θ sees, drawn per row after the batch's noise: 0 (the default) trains on the
    /// features as they are.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub feature_dropout: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Everything a training run needs; saved beside every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub model: ModelConfig,
    pub ssl: SslConfig,
    pub classifier: ClassifierConfig,
    pub card: CardTrainConfig,
    /// Use only the first N Training rows / PublicTest rows (CI-sized runs).
    pub train_limit: Option<usize>,
    pub val_limit: Option<usize>,
    /// Dataset cache directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// FER+ vote file (same rows as `data`): train on FER+'s eight classes and the crowd's votes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// Accept a vote file whose checksum is not FER+'s.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labels_unverified: bool,
    /// Operands of the training steps' Winograd GEMMs: `"f32"` (the default) or `"bf16"` (f32
    /// sums; where the CPU has AVX512-BF16, else f32, said at the start of each stage). See
    /// [`crate::kernels::precision`].
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
    /// Warm restarts of the supervised stage that `train all` runs after its CARD stage, in
    /// order (none by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycles: Vec<CycleConfig>,
    /// What `train all` does after the CARD stage (and the cycles) to make a shippable model
    /// (`None`: nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ship: Option<ShipConfig>,
}

/// One warm restart of the supervised stage, run by `fer-cam train all` after the recipe's CARD
/// stage into `RUN/cycleN/` (N = 2, 3, … in the order of `cycles`): f_φ starts from the
/// previous model's encoder with a fresh head and a new cosine schedule (its `classifier`
/// settings), then a CARD head is trained on its frozen encoder (its `card` settings). The
/// previous model is the recipe's own (`RUN/card`), then each cycle's (or its soup's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CycleConfig {
    /// The stage's settings; `init` and `distill` are not allowed here (the cycle starts from
    /// the previous model, and `distill` below names no teacher).
    pub classifier: ClassifierConfig,
    pub card: CardTrainConfig,
    /// f_φ learns also from the previous model's probabilities (that model is the teacher:
    /// self-distillation; nothing from outside the run unless `also` names models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<CycleDistill>,
    /// Then the mean of this cycle's f_φ and the model it started from (a model soup; the two
    /// lie in one basin) is written to `RUN/soupN/`, a CARD head is trained on its frozen
    /// encoder, and the soup is the previous model for what follows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub average: bool,
}

/// A cycle's distillation from the model before it: [`DistillConfig`] less the teacher, with
/// `also` naming models from outside the run that teach beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CycleDistill {
    pub tta: Tta,
    pub weight: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<PathBuf>,
}

impl CycleDistill {
    /// The distillation from `teacher` (and `also`) this asks for.
    pub fn from_teacher(&self, teacher: PathBuf) -> DistillConfig {
        DistillConfig {
            teacher,
            also: self.also.clone(),
            tta: self.tta,
            weight: self.weight,
        }
    }
}

/// The steps between the CARD stage and a model directory that ships, run by `fer-cam train
/// all` into `RUN/ship/`: a calibration on PublicTest under each of `tta`'s test-time views
/// (`calibration-<views>.json` and its diagram), then the export with `weights` and all the
/// calibrations, the first setting the model's default views (`model/`). Each step is skipped
/// when its output exists, so `--resume` finishes an interrupted run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipConfig {
    pub tta: Vec<Tta>,
    /// `"f16"` (the default: half where every value fits) or `"f32"`.
    #[serde(default)]
    pub weights: StoredWeights,
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

impl TrainConfig {
    /// Defaults for a run on `data` writing to `run_dir`.
    pub fn new(data: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            data,
            run_dir,
            seed: 0,
            model: ModelConfig::default(),
            ssl: SslConfig {
                opt: StageConfig {
                    epochs: 10,
                    batch_size: 128,
                    lr: 1e-3,
                    weight_decay: 1e-4,
                    warmup_epochs: 1.0,
                    augment: Augment::ssl(),
                },
                projector: vec![2048, 2048, 2048],
                lambda: crate::model::barlow::DEFAULT_LAMBDA,
                extra_images: Vec::new(),
                knn_references: default_knn_references(),
            },
            classifier: ClassifierConfig {
                opt: StageConfig {
                    epochs: 30,
                    batch_size: 64,
                    lr: 1e-3,
                    weight_decay: 0.05,
                    warmup_epochs: 1.0,
                    augment: Augment::supervised(),
                },
                label_smoothing: 0.1,
                targets: Targets::Label,
                single_label_weight: 0.0,
                init: None,
                distill: None,
                mixup: 0.0,
                consistency: None,
                keep: Keep::Best,
            },
            card: CardTrainConfig {
                epochs: 20,
                batch_size: 256,
                lr: 1e-3,
                weight_decay: 0.0,
                val_samples: 16,
                y0: CardY0::OneHot,
                feature_dropout: 0.0,
            },
            train_limit: None,
            val_limit: None,
            cache_dir: None,
            labels: None,
            labels_unverified: false,
            precision: Precision::F32,
            cycles: Vec::new(),
            ship: None,
        }
    }

    /// The directory of the last model `train all` trains: the CARD stage's model, or the last
    /// cycle's (its soup's where it is averaged).
    pub fn final_model(&self) -> PathBuf {
        let dir = match self.cycles.len() {
            0 => self.run_dir.clone(),
            n => self.cycle_dir(n - 1, self.cycles[n - 1].average),
        };
        super::model_dir(&dir, super::Stage::Card)
    }

    /// Run directory of cycle `i` (0-based; named from 2, the recipe's own stages being the
    /// first), or of its soup.
    pub fn cycle_dir(&self, i: usize, soup: bool) -> PathBuf {
        let kind = if soup { "soup" } else { "cycle" };
        self.run_dir.join(format!("{kind}{}", i + 2))
    }

    /// Checks every value before anything runs.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        if let Some(ship) = &self.ship {
            let distinct = ship
                .tta
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            if ship.tta.is_empty() || distinct != ship.tta.len() {
                return bad("ship.tta: one or more distinct test-time views".into());
            }
        }
        check_stage("ssl", &self.ssl.opt)?;
        if self.ssl.projector.is_empty() || self.ssl.projector.contains(&0) {
            return bad(format!(
                "ssl.projector {:?} (non-empty, no zero widths)",
                self.ssl.projector
            ));
        }
        check_classifier("classifier", &self.classifier)?;
        check_card("card", &self.card)?;
        for (i, c) in self.cycles.iter().enumerate() {
            let name = format!("cycles[{i}]");
            check_classifier(&format!("{name}.classifier"), &c.classifier)?;
            check_card(&format!("{name}.card"), &c.card)?;
            if c.classifier.init.is_some() || c.classifier.distill.is_some() {
                return bad(format!(
                    "{name}.classifier: no init or distill in a cycle (it starts from, and \
                     distils from, the model before it: use {name}.distill)"
                ));
            }
            if let Some(d) = &c.distill {
                check_share(&format!("{name}.distill.weight"), d.weight)?;
            }
        }
        Ok(())
    }
}

/// One stage's optimisation settings, named `name` in the error.
fn check_stage(name: &str, o: &StageConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if o.batch_size < 2 {
        return bad(format!(
            "{name}.batch_size {} (must be >= 2 for batch-norm)",
            o.batch_size
        ));
    }
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return bad(format!("{name}.lr {} (must be > 0)", o.lr));
    }
    if o.epochs == 0 {
        // Zero epochs would ship the untrained network as a trained stage.
        return bad(format!("{name}.epochs 0 (at least 1)"));
    }
    if o.weight_decay.is_nan()
        || o.weight_decay < 0.0
        || o.warmup_epochs.is_nan()
        || o.warmup_epochs < 0.0
    {
        return bad(format!(
            "{name}: weight_decay and warmup_epochs must be >= 0"
        ));
    }
    o.augment
        .validate()
        .map_err(|e| Error::Config(format!("{name}.{e}")))
}

/// A share of a target, in [0, 1].
fn check_share(name: &str, w: f64) -> Result<()> {
    if (0.0..=1.0).contains(&w) {
        Ok(())
    } else {
        Err(Error::Config(format!("{name} {w} (allowed 0..=1)")))
    }
}

fn check_classifier(name: &str, c: &ClassifierConfig) -> Result<()> {
    check_stage(name, &c.opt)?;
    if !(0.0..1.0).contains(&c.label_smoothing) {
        return Err(Error::Config(format!(
            "{name}.label_smoothing {} (allowed 0..1)",
            c.label_smoothing
        )));
    }
    check_share(
        &format!("{name}.single_label_weight"),
        c.single_label_weight,
    )?;
    if !(c.mixup >= 0.0 && c.mixup.is_finite()) {
        return Err(Error::Config(format!(
            "{name}.mixup {} (Beta's α: 0 for none, else > 0)",
            c.mixup
        )));
    }
    if let Some(k) = &c.consistency {
        if !(k.weight > 0.0 && k.weight.is_finite()) {
            return Err(Error::Config(format!(
                "{name}.consistency.weight {} (allowed > 0)",
                k.weight
            )));
        }
        k.webcam
            .validate()
            .map_err(|e| Error::Config(format!("{name}.consistency: {e}")))?;
        if k.webcam == Webcam::default() {
            return Err(Error::Config(format!(
                "{name}.consistency.webcam changes nothing (set at least one condition)"
            )));
        }
    }
    match &c.distill {
        Some(d) => check_share(&format!("{name}.distill.weight"), d.weight),
        None => Ok(()),
    }
}

fn check_card(name: &str, c: &CardTrainConfig) -> Result<()> {
    if c.batch_size < 2 || !(c.lr > 0.0 && c.lr.is_finite()) || c.val_samples == 0 || c.epochs == 0
    {
        return Err(Error::Config(format!(
            "{name}: batch_size {} (>= 2), lr {} (> 0), val_samples {} (>= 1), epochs {} (>= 1)",
            c.batch_size, c.lr, c.val_samples, c.epochs
        )));
    }
    if !(0.0..1.0).contains(&c.feature_dropout) {
        return Err(Error::Config(format!(
            "{name}: feature_dropout {} (0 to below 1)",
            c.feature_dropout
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_epochs_are_refused_rather_than_shipping_an_untrained_stage() {
        let base = TrainConfig::new("d.csv".into(), "run".into());
        base.validate().unwrap();
        let mut c = base.clone();
        c.classifier.opt.epochs = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("classifier.epochs 0"));
        let mut c = base.clone();
        c.ssl.opt.epochs = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ssl.epochs 0"));
        let mut c = base;
        c.card.epochs = 0;
        assert!(c.validate().unwrap_err().to_string().contains("epochs 0"));
    }

    #[test]
    fn consistency_is_optional_and_checked() {
        let mut cfg = TrainConfig::new("d.csv".into(), "run".into());
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json["classifier"].get("consistency").is_none());
        let camera = Webcam {
            blur_max: 1.0,
            ..Webcam::default()
        };
        cfg.classifier.consistency = Some(Consistency {
            weight: 1.0,
            webcam: camera.clone(),
        });
        let back: TrainConfig =
            serde_json::from_value(serde_json::to_value(&cfg).unwrap()).unwrap();
        assert_eq!(back.classifier.consistency, cfg.classifier.consistency);
        back.validate().unwrap();
        for (weight, webcam, says) in [
            (0.0, camera.clone(), "consistency.weight"),
            (f64::NAN, camera.clone(), "consistency.weight"),
            (1.0, Webcam::default(), "changes nothing"),
            (
                1.0,
                Webcam {
                    noise_max: 100.0,
                    ..camera
                },
                "noise_max",
            ),
        ] {
            cfg.classifier.consistency = Some(Consistency { weight, webcam });
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn mixup_is_optional_and_checked() {
        let mut cfg = TrainConfig::new("d.csv".into(), "run".into());
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json["classifier"].get("mixup").is_none());
        cfg.classifier.mixup = 0.2;
        let back: TrainConfig =
            serde_json::from_value(serde_json::to_value(&cfg).unwrap()).unwrap();
        assert_eq!(back.classifier.mixup, 0.2);
        back.validate().unwrap();
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            cfg.classifier.mixup = bad;
            assert!(cfg.validate().unwrap_err().to_string().contains("mixup"));
        }
    }

    #[test]
    fn keep_is_optional_and_names_best_or_last() {
        let mut cfg = TrainConfig::new("d.csv".into(), "run".into());
        // The default (best) is not written, so configs from before it read and write as they did.
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json["classifier"].get("keep").is_none());
        cfg.classifier.keep = Keep::Last;
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(json["classifier"]["keep"], "last");
        let back: TrainConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.classifier.keep, Keep::Last);
        let mut bad = json;
        bad["classifier"]["keep"] = "newest".into();
        let e = serde_json::from_value::<TrainConfig>(bad).unwrap_err();
        assert!(e.to_string().contains("newest"), "{e}");
    }

    #[test]
    fn card_feature_dropout_is_optional_and_checked() {
        let mut cfg = TrainConfig::new("d.csv".into(), "run".into());
        // Off, it is not written, so configs from before it read and write as they did.
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json["card"].get("feature_dropout").is_none());
        cfg.card.feature_dropout = 0.8;
        cfg.validate().unwrap();
        for bad in [1.0, -0.1, f64::NAN] {
            cfg.card.feature_dropout = bad;
            assert!(cfg
                .validate()
                .unwrap_err()
                .to_string()
                .contains("feature_dropout"));
        }
    }

    #[test]
    fn distillation_is_optional_and_its_weight_is_checked() {
        let mut cfg = TrainConfig::new("d.csv".into(), "run".into());
        // A config written before distillation existed still reads, and without it writes none.
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json["classifier"].get("distill").is_none());
        let back: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, cfg);
        cfg.classifier.distill = Some(DistillConfig::new("teacher".into()));
        cfg.validate().unwrap();
        let back: TrainConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back.classifier.distill.as_ref().unwrap().tta, Tta::TenCrop);
        for w in [-0.1, 1.5, f64::NAN] {
            cfg.classifier.distill.as_mut().unwrap().weight = w;
            assert!(cfg.validate().is_err(), "{w}");
        }
    }

    #[test]
    fn a_cycles_outside_teachers_join_the_model_before_it() {
        let json = r#"{"tta": "flip", "weight": 0.5, "also": ["a", "b"]}"#;
        let cycle: CycleDistill = serde_json::from_str(json).unwrap();
        let d = cycle.from_teacher("prev".into());
        assert_eq!(d.teacher, PathBuf::from("prev"));
        assert_eq!(d.also, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!((d.tta, d.weight), (Tta::Flip, 0.5));
        // Without `also` (configs written before it): the model before alone.
        let plain: CycleDistill =
            serde_json::from_str(r#"{"tta": "flip", "weight": 0.5}"#).unwrap();
        assert!(plain.from_teacher("prev".into()).also.is_empty());
    }
}
