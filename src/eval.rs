//! Scoring a model on a labelled split: accuracy, PAvPU (CARD's t-test protocol and the paper's
//! threshold variant), per-class recall, confusion matrix, ECE, NLL and throughput.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::config::canonical_class;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::infer::{Classifier, Tta};
use crate::metrics;

/// Options of one evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Crops per forward pass.
    pub batch_size: usize,
    /// Confidence threshold of the paper's PAvPU variant.
    pub threshold: f32,
    /// Bins of the ECE.
    pub ece_bins: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 64,
            threshold: 0.5,
            ece_bins: 15,
        }
    }
}

/// Everything `fer-cam eval` reports (also its `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub split: String,
    pub images: usize,
    pub classes: Vec<String>,
    pub samples: usize,
    pub steps: usize,
    pub seed: u64,
    /// Test-time views per face.
    pub tta: Tta,
    /// How the encoder's inference weights were stored: `f16` or `f32`.
    pub weights: String,
    pub accuracy: f64,
    /// Accuracy of f_φ alone (the CARD prior mean's argmax).
    pub fphi_accuracy: f64,
    /// CARD protocol: paired t-test between the two most-voted classes, p < alpha ⇒ certain.
    pub pavpu_ttest: f64,
    pub pavpu_alpha: f64,
    /// The paper's variant: confidence ≥ threshold ⇒ certain.
    pub pavpu_threshold: f64,
    pub threshold: f32,
    pub certain_fraction: f64,
    pub per_class_recall: Vec<f64>,
    /// Rows are true classes, columns predictions.
    pub confusion: Vec<Vec<usize>>,
    pub ece: f64,
    pub nll: f64,
    /// Against the data's label distributions (a crowd's votes), when it has them: mean
    /// cross-entropy `−Σ q·ln p`, and the ECE of the top class against its share of the votes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_nll: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_ece: Option<f64>,
    /// The same answers scored on the rows whose label passes Barsoum et al.'s majority protocol
    /// (FER+), when the data marks them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub barsoum_majority: Option<SubsetAccuracy>,
    /// The same answers scored on the images whose pixels no Training image repeats (FER2013
    /// repeats some across its splits), when the data marks them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen: Option<SubsetAccuracy>,
    /// Images of the split whose class the model does not have, by class (not scored).
    pub left_out: Vec<LeftOutClass>,
    /// Data classes the model has no class of that name for: a prediction of such a model class
    /// is always wrong.
    pub model_only_classes: Vec<String>,
    /// Rows of the split the label set itself left out (FER+: majority unknown, not a face, or
    /// shared), set by the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_rows_left_out: Option<crate::data::ferplus::LeftOut>,
    pub wall_seconds: f64,
    pub images_per_second: f64,
}

/// Accuracy over a subset of the scored images.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubsetAccuracy {
    pub images: usize,
    /// CARD majority vote.
    pub accuracy: f64,
    /// f_φ alone.
    pub fphi_accuracy: f64,
}

impl SubsetAccuracy {
    /// Scores `pred` and `fphi` against `labels` on the images whose `mark` (a per-image flag
    /// of the data) is `want`; `None` when `mark` is empty (the data has no such flags).
    pub fn of(
        mark: &[bool],
        want: bool,
        pred: &[usize],
        fphi: &[usize],
        labels: &[usize],
    ) -> Option<Self> {
        if mark.is_empty() {
            return None;
        }
        let pick = |v: &[usize]| -> Vec<usize> {
            v.iter()
                .zip(mark)
                .filter(|(_, &m)| m == want)
                .map(|(&x, _)| x)
                .collect()
        };
        let labels = pick(labels);
        Some(Self {
            images: labels.len(),
            accuracy: metrics::accuracy(&pick(pred), &labels),
            fphi_accuracy: metrics::accuracy(&pick(fphi), &labels),
        })
    }
}

/// Images of one class left out of the scoring.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeftOutClass {
    pub class: String,
    pub images: usize,
}

/// For each of the data's classes, the model's class of the same name (by
/// [`crate::config::canonical_class`]). At least one name must be shared.
pub fn match_classes(model: &[String], data: &[String]) -> Result<Vec<Option<usize>>> {
    let model_names: Vec<String> = model.iter().map(|c| canonical_class(c)).collect();
    let map: Vec<Option<usize>> = data
        .iter()
        .map(|d| {
            let d = canonical_class(d);
            model_names.iter().position(|m| *m == d)
        })
        .collect();
    if map.iter().all(Option::is_none) {
        return Err(Error::Config(format!(
            "the model's classes [{}] share no name with the data's [{}]",
            crate::log::escape(&model.join(", ")),
            crate::log::escape(&data.join(", "))
        )));
    }
    Ok(map)
}

/// A split restricted to the images whose class the model has, and their labels in the model's
/// classes.
pub struct InModelClasses {
    pub data: Dataset,
    pub labels: Vec<usize>,
    /// For each of the data's classes, the model's class of that name ([`match_classes`]).
    pub to_model: Vec<Option<usize>>,
}

impl InModelClasses {
    pub fn new(model_classes: &[String], data: &Dataset) -> Result<Self> {
        let to_model = match_classes(model_classes, &data.class_names)?;
        let data = data.select(|i| to_model[data.labels[i] as usize].is_some());
        let labels = data
            .labels
            .iter()
            .filter_map(|&l| to_model[l as usize])
            .collect();
        Ok(Self {
            data,
            labels,
            to_model,
        })
    }
}

/// The CARD vote of every image in `pixels` (48x48 crops, row-major), `batch` at a time;
/// `progress(done)` after each batch.
pub fn vote_labels(
    classifier: &mut Classifier,
    pixels: &[u8],
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<usize>> {
    let px = crate::data::FACE_PIXELS;
    let mut out = Vec::with_capacity(pixels.len() / px);
    for chunk in pixels.chunks(batch.max(1) * px) {
        out.extend(classifier.predict(chunk)?.into_iter().map(|p| p.card.label));
        progress(out.len());
    }
    Ok(out)
}

/// Runs the classifier over every image of `data` (already restricted to one split), matching
/// the model's classes to the data's by name: images of a class the model lacks are left out
/// (and counted), and a prediction of a class the data lacks counts as wrong. Metrics are in
/// the model's classes. `progress(done)` is called after each batch.
pub fn evaluate(
    classifier: &mut Classifier,
    data: &Dataset,
    opts: &EvalOptions,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let model_classes = classifier.config().classes.clone();
    let scored = InModelClasses::new(&model_classes, data)?;
    let to_model = &scored.to_model;
    let left_out: Vec<LeftOutClass> = data
        .class_counts()
        .into_iter()
        .zip(&data.class_names)
        .zip(to_model)
        .filter(|((n, _), m)| m.is_none() && *n > 0)
        .map(|((images, class), _)| LeftOutClass {
            class: class.clone(),
            images,
        })
        .collect();
    let model_only_classes: Vec<String> = model_classes
        .iter()
        .enumerate()
        .filter(|(m, _)| !to_model.contains(&Some(*m)))
        .map(|(_, c)| c.clone())
        .collect();
    let (data, labels) = (&scored.data, scored.labels);
    if data.is_empty() {
        return Err(Error::Msg("no images to evaluate".into()));
    }
    if classifier.config().input.size != crate::data::FACE_SIZE {
        return Err(Error::Config(format!(
            "model input size {} differs from the dataset's {}",
            classifier.config().input.size,
            crate::data::FACE_SIZE
        )));
    }
    let batch = opts.batch_size.max(1);
    let start = Instant::now();
    let mut preds = Vec::with_capacity(data.len());
    let px = crate::data::FACE_PIXELS;
    for (k, chunk) in data.pixels.chunks(batch * px).enumerate() {
        preds.extend(classifier.predict(chunk)?);
        progress((k * batch + chunk.len() / px).min(data.len()));
    }
    let wall = start.elapsed().as_secs_f64();
    // A NaN is never scored as an answer (its argmax would count as the first class).
    let broken = preds.iter().filter(|p| !p.is_finite()).count();
    if broken > 0 {
        return Err(Error::Msg(format!(
            "the model gave non-finite probabilities for {broken} of {} images (damaged weights \
             or temperatures?); nothing is scored",
            preds.len()
        )));
    }
    // The votes in the model's classes: a data class without a model class drops out, and the
    // rest are renormalised.
    let targets: Option<Vec<Vec<f32>>> = (!data.soft.is_empty()).then(|| {
        (0..data.len())
            .map(|i| {
                let mut q = vec![0f32; model_classes.len()];
                for (d, &v) in data.soft_row(i).unwrap_or(&[]).iter().enumerate() {
                    if let Some(m) = to_model[d] {
                        q[m] += v;
                    }
                }
                let total: f32 = q.iter().sum();
                q.iter().map(|v| v / total.max(1e-12)).collect()
            })
            .collect()
    });
    let pred: Vec<usize> = preds.iter().map(|p| p.card.label).collect();
    let fphi: Vec<usize> = preds
        .iter()
        .map(|p| metrics::argmax(&p.fphi_probs))
        .collect();
    let barsoum_majority = SubsetAccuracy::of(&data.strict_majority, true, &pred, &fphi, &labels);
    let unseen = SubsetAccuracy::of(&data.seen_in_training, false, &pred, &fphi, &labels);
    let accurate: Vec<bool> = pred.iter().zip(&labels).map(|(p, l)| p == l).collect();
    let p_values: Vec<f64> = preds.iter().map(|p| p.card.p_value).collect();
    let probs: Vec<Vec<f32>> = preds.iter().map(|p| p.card.probs.clone()).collect();
    let confidence: Vec<f32> = probs
        .iter()
        .map(|p| p.get(metrics::argmax(p)).copied().unwrap_or(0.0))
        .collect();
    let alpha = classifier.config().card.alpha;
    let confusion = metrics::confusion_matrix(&pred, &labels, model_classes.len());
    let sampler = classifier.sampler();
    Ok(EvalReport {
        model: String::new(),
        data: String::new(),
        split: String::new(),
        images: data.len(),
        classes: model_classes,
        samples: classifier.samples_per_face(),
        steps: sampler.steps,
        seed: sampler.seed,
        tta: classifier.tta(),
        weights: classifier.weight_format().name().to_string(),
        accuracy: metrics::accuracy(&pred, &labels),
        fphi_accuracy: metrics::accuracy(&fphi, &labels),
        pavpu_ttest: metrics::pavpu_ttest(&accurate, &p_values, alpha),
        pavpu_alpha: alpha,
        pavpu_threshold: metrics::pavpu_threshold(&accurate, &confidence, opts.threshold),
        threshold: opts.threshold,
        certain_fraction: p_values.iter().filter(|&&p| p < alpha).count() as f64
            / data.len() as f64,
        per_class_recall: metrics::per_class_recall(&confusion),
        confusion,
        ece: metrics::ece(&probs, &labels, opts.ece_bins),
        nll: metrics::nll(&probs, &labels),
        soft_nll: targets.as_ref().map(|q| metrics::soft_nll(&probs, q)),
        soft_ece: targets
            .as_ref()
            .map(|q| metrics::soft_ece(&probs, q, opts.ece_bins)),
        barsoum_majority,
        unseen,
        left_out,
        model_only_classes,
        label_rows_left_out: None,
        wall_seconds: wall,
        images_per_second: data.len() as f64 / wall.max(1e-9),
    })
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model:    {} ({} weights)", self.model, self.weights)?;
        writeln!(
            f,
            "data:     {} [{}], {} images",
            self.data, self.split, self.images
        )?;
        writeln!(
            f,
            "sampler:  {} samples, {} steps, seed {}{}",
            self.samples,
            self.steps,
            self.seed,
            match self.tta {
                Tta::None => String::new(),
                t => format!(", {} TTA", t.name()),
            }
        )?;
        writeln!(
            f,
            "accuracy (CARD majority vote): {:.2}%",
            100.0 * self.accuracy
        )?;
        writeln!(
            f,
            "accuracy (f_phi alone):        {:.2}%",
            100.0 * self.fphi_accuracy
        )?;
        writeln!(
            f,
            "PAvPU (t-test, alpha={}):      {:.2}%   ({:.1}% of images certain)",
            self.pavpu_alpha,
            100.0 * self.pavpu_ttest,
            100.0 * self.certain_fraction
        )?;
        writeln!(
            f,
            "PAvPU (confidence >= {:.2}):    {:.2}%",
            self.threshold,
            100.0 * self.pavpu_threshold
        )?;
        writeln!(f, "ECE: {:.4}   NLL: {:.4}", self.ece, self.nll)?;
        if let (Some(e), Some(n)) = (self.soft_ece, self.soft_nll) {
            writeln!(f, "against the votes: ECE {e:.4}   NLL {n:.4}")?;
        }
        if let Some(b) = &self.barsoum_majority {
            writeln!(
                f,
                "majority, Barsoum et al.'s protocol ({} of {} images: single votes dropped, the \
                 label more than half of the rest): CARD vote {:.2}%, f_phi {:.2}%",
                b.images,
                self.images,
                100.0 * b.accuracy,
                100.0 * b.fphi_accuracy
            )?;
        }
        if let Some(u) = self
            .unseen
            .as_ref()
            .filter(|u| u.images > 0 && u.images < self.images)
        {
            writeln!(
                f,
                "images no Training image repeats ({} of {}; the rest are a Training image's \
                 pixels): CARD vote {:.2}%, f_phi {:.2}%",
                u.images,
                self.images,
                100.0 * u.accuracy,
                100.0 * u.fphi_accuracy
            )?;
        }
        if let Some(l) = &self.label_rows_left_out {
            writeln!(f, "by the labels: {l}")?;
        }
        for l in &self.left_out {
            writeln!(
                f,
                "left out: {} images of {:?}, a class the model does not have",
                l.images, l.class
            )?;
        }
        if !self.model_only_classes.is_empty() {
            writeln!(
                f,
                "model classes the labels lack (always wrong when predicted): {}",
                self.model_only_classes.join(", ")
            )?;
        }
        writeln!(f, "per-class recall:")?;
        let width = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        for (c, r) in self.classes.iter().zip(&self.per_class_recall) {
            if r.is_nan() {
                writeln!(f, "  {c:>width$}       – (no images)")?;
            } else {
                writeln!(f, "  {c:>width$}  {:6.2}%", 100.0 * r)?;
            }
        }
        writeln!(f, "confusion matrix (rows: true, columns: predicted):")?;
        write!(f, "  {:>width$}", "")?;
        for c in &self.classes {
            write!(f, " {:>7}", c.chars().take(7).collect::<String>())?;
        }
        writeln!(f)?;
        for (c, row) in self.classes.iter().zip(&self.confusion) {
            write!(f, "  {c:>width$}")?;
            for v in row {
                write!(f, " {v:>7}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "time: {:.1} s, {:.1} images/s",
            self.wall_seconds, self.images_per_second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn subset_accuracy_scores_only_the_marked_images() {
        let (pred, fphi, labels) = ([0, 1, 2, 2], [0, 0, 2, 1], [0, 1, 1, 2]);
        let mark = [true, true, false, true];
        let s = SubsetAccuracy::of(&mark, true, &pred, &fphi, &labels).unwrap();
        assert_eq!(s.images, 3);
        assert!((s.accuracy - 1.0).abs() < 1e-12);
        assert!((s.fphi_accuracy - 1.0 / 3.0).abs() < 1e-12);
        // The unmarked image alone: CARD says 2, f_φ 2, the label is 1.
        let s = SubsetAccuracy::of(&mark, false, &pred, &fphi, &labels).unwrap();
        assert_eq!(s.images, 1);
        assert_eq!((s.accuracy, s.fphi_accuracy), (0.0, 0.0));
        assert_eq!(SubsetAccuracy::of(&[], true, &pred, &fphi, &labels), None);
    }

    #[test]
    fn classes_match_by_name_across_seven_and_eight() {
        let seven = names(&crate::config::FER2013_CLASSES);
        let eight = names(&crate::data::ferplus::FERPLUS_CLASSES);
        // An 8-class model on 7-class labels: every label has its class; contempt is model-only.
        let m = match_classes(&eight, &seven).unwrap();
        assert_eq!(m, (0..7).map(Some).collect::<Vec<_>>());
        // A 7-class model on 8-class labels: contempt rows have no class.
        let m = match_classes(&seven, &eight).unwrap();
        assert_eq!(m[7], None);
        assert_eq!(m[3], Some(3));
        // Synonyms and another order.
        let m = match_classes(&names(&["Happiness", "anger"]), &seven).unwrap();
        assert_eq!(m[0], Some(1));
        assert_eq!(m[3], Some(0));
        assert_eq!(m[2], None);
        let e = match_classes(&names(&["cat", "dog"]), &seven).unwrap_err();
        assert!(e.to_string().contains("share no name"), "{e}");
    }
}
