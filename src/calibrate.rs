//! Temperature calibration of the CARD sampler (the idea of CARD's `--tune_T`): the per-sample
//! probabilities are `softmax(−(ŷ_0 − 1)²/τ)` and the reported probabilities their mean over
//! samples, so τ sets how confident fer-cam sounds without changing a single vote. `calibrate`
//! draws the samples of a labelled split once, then picks the τ that minimises the negative
//! log-likelihood of the mean probabilities. Fit it on PublicTest; report on PrivateTest.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::infer::Classifier;
use crate::metrics::{self, ReliabilityBin};

/// Smallest and largest temperature searched.
pub const TAU_RANGE: (f64, f64) = (1e-3, 1e3);

/// ŷ_0 samples of a labelled set: `n` images × `samples` × `classes`, flat.
#[derive(Debug, Clone)]
pub struct Samples {
    pub y0: Vec<f32>,
    pub samples: usize,
    pub classes: usize,
    pub labels: Vec<usize>,
}

impl Samples {
    /// Draws the classifier's samples for every image of `data` (`progress(done)` per batch).
    pub fn draw(
        classifier: &mut Classifier,
        data: &Dataset,
        batch: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Msg("no images to calibrate on".into()));
        }
        let px = crate::data::FACE_PIXELS;
        let mut y0 = Vec::new();
        for (k, chunk) in data.pixels.chunks(batch.max(1) * px).enumerate() {
            y0.extend(classifier.sample_y0(chunk)?);
            progress((k * batch.max(1) + chunk.len() / px).min(data.len()));
        }
        Ok(Self {
            y0,
            samples: classifier.sampler().samples,
            classes: classifier.config().num_classes(),
            labels: data.labels.iter().map(|&l| l as usize).collect(),
        })
    }

    /// Mean over samples of `softmax(−(ŷ_0 − 1)²/τ)`, one row per image (as the daemon reports).
    pub fn mean_probs(&self, tau: f64) -> Vec<Vec<f32>> {
        let (s, c) = (self.samples, self.classes);
        self.y0
            .chunks_exact(s * c)
            .map(|image| {
                let mut mean = vec![0f64; c];
                let mut scores = vec![0f64; c];
                for row in image.chunks_exact(c) {
                    for (sc, &y) in scores.iter_mut().zip(row) {
                        *sc = -((y as f64 - 1.0).powi(2)) / tau;
                    }
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|v| (v - max).exp()).sum();
                    for (m, v) in mean.iter_mut().zip(&scores) {
                        *m += (v - max).exp() / z;
                    }
                }
                mean.iter().map(|m| (m / s as f64) as f32).collect()
            })
            .collect()
    }

    /// NLL of the mean probabilities at temperature τ.
    pub fn nll(&self, tau: f64) -> f64 {
        metrics::nll(&self.mean_probs(tau), &self.labels)
    }

    /// ECE of the mean probabilities at temperature τ.
    pub fn ece(&self, tau: f64, bins: usize) -> f64 {
        metrics::ece(&self.mean_probs(tau), &self.labels, bins)
    }
}

/// The τ in [`TAU_RANGE`] with the least NLL: a coarse grid over log τ, then golden-section
/// search inside the best grid cell's neighbours.
pub fn fit_temperature(samples: &Samples) -> f64 {
    let (lo, hi) = (TAU_RANGE.0.ln(), TAU_RANGE.1.ln());
    let grid = 61;
    let at = |i: usize| lo + (hi - lo) * i as f64 / (grid - 1) as f64;
    let nll = |log_tau: f64| {
        let v = samples.nll(log_tau.exp());
        if v.is_finite() {
            v
        } else {
            f64::INFINITY
        }
    };
    let best = (0..grid)
        .map(|i| (i, nll(at(i))))
        .fold((0, f64::INFINITY), |b, p| if p.1 < b.1 { p } else { b })
        .0;
    let (mut a, mut b) = (at(best.saturating_sub(1)), at((best + 1).min(grid - 1)));
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (b - g * (b - a), a + g * (b - a));
    let (mut f1, mut f2) = (nll(x1), nll(x2));
    while b - a > 1e-4 {
        if f1 <= f2 {
            b = x2;
            (x2, f2) = (x1, f1);
            x1 = b - g * (b - a);
            f1 = nll(x1);
        } else {
            a = x1;
            (x1, f1) = (x2, f2);
            x2 = a + g * (b - a);
            f2 = nll(x2);
        }
    }
    ((a + b) / 2.0).exp()
}

/// What `fer-cam calibrate` writes (`calibration/<name>.json`).
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    pub model: String,
    pub data: String,
    pub split: String,
    pub images: usize,
    pub samples: usize,
    pub steps: usize,
    pub seed: u64,
    /// The temperature in the model's config before, and the fitted one.
    pub temperature_before: f64,
    pub temperature: f64,
    pub ece_bins: usize,
    pub ece_before: f64,
    pub ece_after: f64,
    pub nll_before: f64,
    pub nll_after: f64,
    /// Accuracy of the mean probabilities' argmax (unchanged by τ up to ties).
    pub accuracy: f64,
    pub reliability_before: Vec<ReliabilityBin>,
    pub reliability_after: Vec<ReliabilityBin>,
}

/// Fits τ on `samples` and reports the split's calibration before (at `tau_before`) and after.
pub fn calibrate(samples: &Samples, tau_before: f64, bins: usize) -> CalibrationReport {
    let tau = fit_temperature(samples);
    let before = samples.mean_probs(tau_before);
    let after = samples.mean_probs(tau);
    let pred: Vec<usize> = after.iter().map(|p| metrics::argmax(p)).collect();
    CalibrationReport {
        model: String::new(),
        data: String::new(),
        split: String::new(),
        images: samples.labels.len(),
        samples: samples.samples,
        steps: 0,
        seed: 0,
        temperature_before: tau_before,
        temperature: tau,
        ece_bins: bins,
        ece_before: metrics::ece(&before, &samples.labels, bins),
        ece_after: metrics::ece(&after, &samples.labels, bins),
        nll_before: metrics::nll(&before, &samples.labels),
        nll_after: metrics::nll(&after, &samples.labels),
        accuracy: metrics::accuracy(&pred, &samples.labels),
        reliability_before: metrics::reliability(&before, &samples.labels, bins),
        reliability_after: metrics::reliability(&after, &samples.labels, bins),
    }
}

/// Draws the reliability diagram (accuracy against confidence per bin, before and after, with
/// the diagonal of perfect calibration) as SVG.
pub fn reliability_svg(report: &CalibrationReport, path: &Path) -> Result<()> {
    let fail = |e: String| Error::file(path, format!("cannot draw the reliability diagram: {e}"));
    let root = SVGBackend::new(path, (560, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let title = format!(
        "{} {}: ECE {:.3} → {:.3} (τ {:.3} → {:.3})",
        report.data_name(),
        report.split,
        report.ece_before,
        report.ece_after,
        report.temperature_before,
        report.temperature
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("confidence (top-class mean probability)")
        .y_desc("accuracy")
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))
        .map_err(|e| fail(e.to_string()))?
        .label("perfect calibration")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.4)));
    let series = [
        (&report.reliability_before, RED, "before"),
        (&report.reliability_after, BLUE, "after"),
    ];
    for (bins, color, name) in series {
        let points: Vec<(f64, f64)> = bins
            .iter()
            .filter(|b| b.count > 0)
            .map(|b| (b.confidence, b.accuracy))
            .collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))
            .map_err(|e| fail(e.to_string()))?
            .label(format!("{name} (τ = {:.3})", tau_of(report, name)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| fail(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))
}

fn tau_of(report: &CalibrationReport, name: &str) -> f64 {
    if name == "before" {
        report.temperature_before
    } else {
        report.temperature
    }
}

impl CalibrationReport {
    /// The data file's name without its folders.
    fn data_name(&self) -> String {
        Path::new(&self.data)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    }
}

/// Reads the fitted temperature from a calibration file written by `fer-cam calibrate`.
pub fn read_temperature(path: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not a calibration file: {e}")))?;
    match v["temperature"].as_f64() {
        Some(t) if t.is_finite() && t > 0.0 => Ok(t),
        _ => Err(Error::file(
            path,
            "no positive finite \"temperature\" in the calibration file",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// One sample per image whose scores are `k·logits` (ŷ_0 = 1 − √(−k·logit) makes the score
    /// −(ŷ_0 − 1)² exactly k·logit), with labels drawn from softmax(logits): a model
    /// over-confident by k, whose best temperature is k.
    fn synthetic(k: f64, n: usize, seed: u64) -> Samples {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = 3;
        let mut y0 = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            // True probabilities from random logits in [-3, 0].
            let logits: Vec<f64> = (0..c).map(|_| -3.0 * rng.random::<f64>()).collect();
            let z: f64 = logits.iter().map(|l| l.exp()).sum();
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let mut label = c - 1;
            for (j, l) in logits.iter().enumerate() {
                acc += l.exp() / z;
                if u < acc {
                    label = j;
                    break;
                }
            }
            labels.push(label);
            // The model is over-confident by a factor k: its scores are k·logits.
            y0.extend(logits.iter().map(|l| (1.0 - (-(k * l)).sqrt()) as f32));
        }
        Samples {
            y0,
            samples: 1,
            classes: c,
            labels,
        }
    }

    #[test]
    fn recovers_the_temperature_of_an_overconfident_model() {
        let s = synthetic(2.5, 20_000, 1);
        let tau = fit_temperature(&s);
        assert!((tau - 2.5).abs() < 0.15, "fitted τ = {tau}, expected ≈ 2.5");
        assert!(s.nll(tau) < s.nll(1.0));
        let r = calibrate(&s, 1.0, 15);
        assert!(r.ece_after < r.ece_before && r.ece_after < 0.02, "{r:?}");
        assert_eq!(r.reliability_after.len(), 15);
    }

    #[test]
    fn mean_probs_match_sample_probs() {
        let y0 = [0.9f32, 0.1, -0.2, 1.3, 0.4, 0.0];
        let s = Samples {
            y0: y0.to_vec(),
            samples: 2,
            classes: 3,
            labels: vec![0],
        };
        let t = candle_core::Tensor::from_slice(&y0, (1, 2, 3), &candle_core::Device::Cpu).unwrap();
        let reference = crate::model::sample_probs(&t, 0.7)
            .unwrap()
            .mean(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in s.mean_probs(0.7)[0].iter().zip(&reference) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn draws_the_diagram_and_reads_back_the_temperature() {
        let s = synthetic(2.0, 2_000, 2);
        let mut r = calibrate(&s, 1.0, 10);
        r.data = "x/fer2013.csv.gz".into();
        r.split = "PublicTest".into();
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("r.svg");
        reliability_svg(&r, &svg).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
        let json = dir.path().join("r.json");
        std::fs::write(&json, serde_json::to_string(&r).unwrap()).unwrap();
        assert!((read_temperature(&json).unwrap() - r.temperature).abs() < 1e-12);
        std::fs::write(&json, "{\"temperature\": -1}").unwrap();
        assert!(read_temperature(&json).is_err());
    }
}
