//! Scoring a model on a labelled split: accuracy, PAvPU (CARD's t-test protocol and the paper's
//! threshold variant), per-class recall, confusion matrix, ECE, NLL and throughput.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

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
    pub wall_seconds: f64,
    pub images_per_second: f64,
}

/// Runs the classifier over every image of `data` (already restricted to one split).
/// `progress(done)` is called after each batch.
pub fn evaluate(
    classifier: &mut Classifier,
    data: &Dataset,
    opts: &EvalOptions,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport> {
    if data.is_empty() {
        return Err(Error::Msg("no images to evaluate".into()));
    }
    if data.class_names != classifier.config().classes {
        return Err(Error::Config(format!(
            "the data's classes [{}] differ from the model's [{}]",
            data.class_names.join(", "),
            classifier.config().classes.join(", ")
        )));
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
    let labels: Vec<usize> = data.labels.iter().map(|&l| l as usize).collect();
    let pred: Vec<usize> = preds.iter().map(|p| p.card.label).collect();
    let fphi: Vec<usize> = preds
        .iter()
        .map(|p| metrics::argmax(&p.fphi_probs))
        .collect();
    let accurate: Vec<bool> = pred.iter().zip(&labels).map(|(p, l)| p == l).collect();
    let p_values: Vec<f64> = preds.iter().map(|p| p.card.p_value).collect();
    let probs: Vec<Vec<f32>> = preds.iter().map(|p| p.card.probs.clone()).collect();
    let confidence: Vec<f32> = probs
        .iter()
        .map(|p| p.get(metrics::argmax(p)).copied().unwrap_or(0.0))
        .collect();
    let alpha = classifier.config().card.alpha;
    let confusion = metrics::confusion_matrix(&pred, &labels, data.class_names.len());
    let sampler = classifier.sampler();
    Ok(EvalReport {
        model: String::new(),
        data: String::new(),
        split: String::new(),
        images: data.len(),
        classes: data.class_names.clone(),
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
        writeln!(f, "per-class recall:")?;
        let width = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        for (c, r) in self.classes.iter().zip(&self.per_class_recall) {
            writeln!(f, "  {c:>width$}  {:6.2}%", 100.0 * r)?;
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
