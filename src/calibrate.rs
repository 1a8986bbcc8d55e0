//! Temperature calibration of the CARD sampler. The per-sample probabilities are
//! `softmax(−(ŷ_0 − 1)²/τ)` (τ: the idea of CARD's `--tune_T`); the reported probabilities are
//! their mean over samples, tempered by a second temperature T (`mean^(1/T)`, renormalised).
//! Neither changes a vote. One τ alone cannot calibrate the mean: a sample near a one-hot ŷ_0
//! caps its top probability at `1/(1 + (C−1)e^(−1/τ))`, so the τ that makes the confident faces
//! sound confident enough makes the doubtful ones sound too sure. `calibrate` draws the samples
//! of a labelled split once, then picks the (τ, T) that minimise the negative log-likelihood of
//! the reported probabilities. Fit on PublicTest; report on PrivateTest.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

pub use crate::config::{Calibration, Temperatures, Tta};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::infer::Classifier;
use crate::metrics::{self, ReliabilityBin};

/// Smallest and largest temperatures searched: those a model may carry.
pub use crate::config::{OUTPUT_RANGE, TAU_RANGE};

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
            samples: classifier.samples_per_face(),
            classes: classifier.config().num_classes(),
            labels: data.labels.iter().map(|&l| l as usize).collect(),
        })
    }

    /// Mean over samples of `softmax(−(ŷ_0 − 1)²/τ)`, one row per image (untempered).
    pub fn mean_probs(&self, tau: f64) -> Vec<Vec<f32>> {
        let (s, c) = (self.samples, self.classes);
        crate::model::sample_probs_rows(&self.y0, c, tau)
            .chunks_exact(s * c)
            .map(|image| {
                let mut mean = vec![0f64; c];
                for row in image.chunks_exact(c) {
                    for (m, &p) in mean.iter_mut().zip(row) {
                        *m += p as f64;
                    }
                }
                mean.iter().map(|m| (m / s as f64) as f32).collect()
            })
            .collect()
    }

    /// The probabilities the daemon reports at temperatures `t`, one row per image.
    pub fn probs(&self, t: Temperatures) -> Vec<Vec<f32>> {
        tempered(&self.mean_probs(t.sample), t.output)
    }

    /// NLL of the reported probabilities at temperatures `t`.
    pub fn nll(&self, t: Temperatures) -> f64 {
        metrics::nll(&self.probs(t), &self.labels)
    }

    /// ECE of the reported probabilities at temperatures `t`.
    pub fn ece(&self, t: Temperatures, bins: usize) -> f64 {
        metrics::ece(&self.probs(t), &self.labels, bins)
    }
}

fn tempered(rows: &[Vec<f32>], t: f64) -> Vec<Vec<f32>> {
    rows.iter().map(|p| metrics::temper(p, t)).collect()
}

/// The x in `range` minimising `f(x)`, searched over log x: a coarse grid, then golden-section
/// search between the best grid point's neighbours. Non-finite values count as +∞.
fn minimize_log(range: (f64, f64), mut f: impl FnMut(f64) -> f64) -> f64 {
    let (lo, hi) = (range.0.ln(), range.1.ln());
    let grid = 41;
    let at = |i: usize| lo + (hi - lo) * i as f64 / (grid - 1) as f64;
    let mut g = |log_x: f64| {
        let v = f(log_x.exp());
        if v.is_finite() {
            v
        } else {
            f64::INFINITY
        }
    };
    let best = (0..grid)
        .map(|i| (i, g(at(i))))
        .fold((0, f64::INFINITY), |b, p| if p.1 < b.1 { p } else { b })
        .0;
    let (mut a, mut b) = (at(best.saturating_sub(1)), at((best + 1).min(grid - 1)));
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (b - r * (b - a), a + r * (b - a));
    let (mut f1, mut f2) = (g(x1), g(x2));
    while b - a > 1e-4 {
        if f1 <= f2 {
            b = x2;
            (x2, f2) = (x1, f1);
            x1 = b - r * (b - a);
            f1 = g(x1);
        } else {
            a = x1;
            (x1, f1) = (x2, f2);
            x2 = a + r * (b - a);
            f2 = g(x2);
        }
    }
    ((a + b) / 2.0).exp()
}

/// The output temperature T minimising the NLL of `mean` (untempered rows) tempered by T.
fn fit_output(mean: &[Vec<f32>], labels: &[usize]) -> f64 {
    minimize_log(OUTPUT_RANGE, |t| metrics::nll(&tempered(mean, t), labels))
}

/// The (τ, T) with the least NLL of the reported probabilities: for each τ the best T, then the
/// best τ of that profile.
pub fn fit_temperatures(samples: &Samples) -> Temperatures {
    let profile = |tau: f64| {
        let mean = samples.mean_probs(tau);
        let t = fit_output(&mean, &samples.labels);
        metrics::nll(&tempered(&mean, t), &samples.labels)
    };
    let sample = minimize_log(TAU_RANGE, profile);
    let output = fit_output(&samples.mean_probs(sample), &samples.labels);
    Temperatures { sample, output }
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
    /// Test-time views the samples were drawn under (the temperatures hold for these only).
    pub tta: Tta,
    /// τ in the model's config before, and the fitted one.
    pub temperature_before: f64,
    pub temperature: f64,
    /// T in the model's config before, and the fitted one.
    pub output_temperature_before: f64,
    pub output_temperature: f64,
    pub ece_bins: usize,
    pub ece_before: f64,
    pub ece_after: f64,
    pub nll_before: f64,
    pub nll_after: f64,
    /// Accuracy of the reported probabilities' argmax (unchanged by τ up to ties, and by T).
    pub accuracy: f64,
    pub reliability_before: Vec<ReliabilityBin>,
    pub reliability_after: Vec<ReliabilityBin>,
}

impl CalibrationReport {
    pub fn temperatures_before(&self) -> Temperatures {
        Temperatures {
            sample: self.temperature_before,
            output: self.output_temperature_before,
        }
    }

    pub fn temperatures(&self) -> Temperatures {
        Temperatures {
            sample: self.temperature,
            output: self.output_temperature,
        }
    }
}

/// Fits (τ, T) on `samples` and reports the split's calibration before (at `before`) and after.
pub fn calibrate(samples: &Samples, before: Temperatures, bins: usize) -> CalibrationReport {
    let fitted = fit_temperatures(samples);
    let p_before = samples.probs(before);
    let after = samples.probs(fitted);
    let pred: Vec<usize> = after.iter().map(|p| metrics::argmax(p)).collect();
    CalibrationReport {
        model: String::new(),
        data: String::new(),
        split: String::new(),
        images: samples.labels.len(),
        samples: samples.samples,
        steps: 0,
        seed: 0,
        tta: Tta::None,
        temperature_before: before.sample,
        temperature: fitted.sample,
        output_temperature_before: before.output,
        output_temperature: fitted.output,
        ece_bins: bins,
        ece_before: metrics::ece(&p_before, &samples.labels, bins),
        ece_after: metrics::ece(&after, &samples.labels, bins),
        nll_before: metrics::nll(&p_before, &samples.labels),
        nll_after: metrics::nll(&after, &samples.labels),
        accuracy: metrics::accuracy(&pred, &samples.labels),
        reliability_before: metrics::reliability(&p_before, &samples.labels, bins),
        reliability_after: metrics::reliability(&after, &samples.labels, bins),
    }
}

/// Draws the reliability diagram (accuracy against confidence per bin, before and after, with
/// the diagonal of perfect calibration) as SVG.
pub fn reliability_svg(report: &CalibrationReport, path: &Path, replace: bool) -> Result<()> {
    let fail = |e: String| Error::file(path, format!("cannot draw the reliability diagram: {e}"));
    // Drawn into memory and written atomically (a stream or a link is written as such).
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let title = format!(
            "{} {}: ECE {:.3} → {:.3}",
            report.data_name(),
            report.split,
            report.ece_before,
            report.ece_after,
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
            .x_desc("confidence (top-class reported probability)")
            .y_desc("accuracy")
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))
            .map_err(|e| fail(e.to_string()))?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.4)));
        let series = [
            (
                &report.reliability_before,
                RED,
                "before",
                report.temperatures_before(),
            ),
            (
                &report.reliability_after,
                BLUE,
                "after",
                report.temperatures(),
            ),
        ];
        for (bins, color, name, t) in series {
            let points: Vec<(f64, f64)> = bins
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| (b.confidence, b.accuracy))
                .collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color))
                .map_err(|e| fail(e.to_string()))?
                .label(format!("{name} (τ {:.3}, T {:.3})", t.sample, t.output))
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
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    if replace {
        crate::fsutil::write_file_atomically(path, svg.as_bytes())
    } else {
        crate::fsutil::create_file_atomically(path, svg.as_bytes())
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

/// Reads the fitted temperatures from a calibration file written by `fer-cam calibrate` (a file
/// from before the output temperature existed has T = 1).
pub fn read_calibration(path: &Path) -> Result<Calibration> {
    let text = crate::fsutil::read_regular(path, 1 << 20)?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::file(path, format!("not a calibration file: {e}")))?;
    let temperatures = Temperatures {
        sample: v["temperature"].as_f64().unwrap_or(f64::NAN),
        output: match &v["output_temperature"] {
            serde_json::Value::Null => 1.0,
            x => x.as_f64().unwrap_or(f64::NAN),
        },
    };
    if !temperatures.is_valid() {
        return Err(Error::file(
            path,
            "the calibration file needs a positive finite \"temperature\" (and \"output_temperature\", if given)",
        ));
    }
    // Files written before test-time views were recorded were fitted without them.
    let tta = match &v["tta"] {
        serde_json::Value::Null => Tta::None,
        x => serde_json::from_value(x.clone()).map_err(|_| {
            Error::file(
                path,
                format!("\"tta\": {x} (must be \"none\", \"flip\" or \"ten-crop\")"),
            )
        })?,
    };
    Ok(Calibration { temperatures, tta })
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

    const PLAIN: Temperatures = Temperatures {
        sample: 1.0,
        output: 1.0,
    };

    #[test]
    fn recovers_the_temperature_of_an_overconfident_model() {
        // With one sample per image τ and T act alike (mean = the sample): only τ·T is fixed.
        let s = synthetic(2.5, 5_000, 1);
        let t = fit_temperatures(&s);
        let product = t.sample * t.output;
        assert!(
            (product - 2.5).abs() < 0.15,
            "fitted τ·T = {product}, expected ≈ 2.5"
        );
        assert!(s.nll(t) < s.nll(PLAIN));
        let r = calibrate(&s, PLAIN, 15);
        assert!(r.ece_after < r.ece_before && r.ece_after < 0.02, "{r:?}");
        assert_eq!(r.reliability_after.len(), 15);
    }

    /// Many samples per image, each one-hot-ish on its own argmax: the mean over samples is
    /// capped below 1 for every τ, so τ alone cannot calibrate it and T must do the rest.
    #[test]
    fn the_output_temperature_calibrates_what_tau_cannot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, samples, c) = (4_000, 8, 3);
        let mut y0 = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            // The label is right with probability q, and so is every sample's vote.
            let q: f64 = 0.4 + 0.6 * rng.random::<f64>();
            let label = if rng.random::<f64>() < q {
                0
            } else {
                1 + (rng.random::<f64>() < 0.5) as usize
            };
            labels.push(label);
            for _ in 0..samples {
                let vote = if rng.random::<f64>() < q {
                    0
                } else {
                    1 + (rng.random::<f64>() < 0.5) as usize
                };
                // ŷ_0 is 1 at the vote and 0 elsewhere.
                y0.extend((0..c).map(|k| if k == vote { 1.0f32 } else { 0.0 }));
            }
        }
        let s = Samples {
            y0,
            samples,
            classes: c,
            labels,
        };
        let tau_only = minimize_log(TAU_RANGE, |tau| {
            s.nll(Temperatures {
                sample: tau,
                output: 1.0,
            })
        });
        let t = fit_temperatures(&s);
        let one = Temperatures {
            sample: tau_only,
            output: 1.0,
        };
        assert!(t.output != 1.0, "{t:?}");
        assert!(
            s.nll(t) < s.nll(one) - 1e-3,
            "{} vs {}",
            s.nll(t),
            s.nll(one)
        );
        assert!(s.ece(t, 15) < s.ece(one, 15), "{t:?}");
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
        let mut r = calibrate(&s, PLAIN, 10);
        r.data = "x/fer2013.csv.gz".into();
        r.split = "PublicTest".into();
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("r.svg");
        reliability_svg(&r, &svg, false).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
        let json = dir.path().join("r.json");
        std::fs::write(&json, serde_json::to_string(&r).unwrap()).unwrap();
        let read = read_calibration(&json).unwrap();
        assert_eq!(read.temperatures, r.temperatures());
        assert_eq!(read.tta, Tta::None);
        r.tta = Tta::Flip;
        std::fs::write(&json, serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(read_calibration(&json).unwrap().tta, Tta::Flip);
        // A file from before the output temperature and the views: T = 1, no views.
        std::fs::write(&json, "{\"temperature\": 0.3}").unwrap();
        let old = read_calibration(&json).unwrap();
        let t = old.temperatures;
        assert_eq!((t.sample, t.output, old.tta), (0.3, 1.0, Tta::None));
        for bad in [
            "{\"temperature\": -1}",
            "{\"temperature\": 0.3, \"output_temperature\": 0}",
            "{\"temperature\": 0.3, \"output_temperature\": \"x\"}",
            "{\"temperature\": 0.3, \"tta\": \"mirror\"}",
            "{\"temperature\": 0.3, \"tta\": 2}",
            "{}",
        ] {
            std::fs::write(&json, bad).unwrap();
            assert!(read_calibration(&json).is_err(), "{bad}");
        }
    }
}
