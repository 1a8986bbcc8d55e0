//! Training curves as SVG plots (loss, and PublicTest accuracy where the stage has one), redrawn
//! from `RUN/metrics.jsonl` after every epoch so resumed runs plot their whole history. SVG keeps
//! the axis labels as text, so no font files are needed.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Error, Result};

/// (epoch, value) series of one stage's `key` from the metrics log.
fn series(metrics: &Path, stage: &str, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["stage"] == stage)
        .filter_map(|v| Some((v["epoch"].as_f64()?, v[key].as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect())
}

/// The y axis of a plot: the data's range padded by 5% (a single value by 5% of itself, at least
/// 0.01), kept inside `bounds` where the quantity has them (an accuracy in 0..=1).
fn y_range(points: &[(f64, f64)], bounds: Option<(f64, f64)>) -> (f64, f64) {
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        (0.05 * lo.abs()).max(0.01)
    };
    let (lo, hi) = (lo - pad, hi + pad);
    match bounds {
        Some((a, b)) => (lo.max(a), hi.min(b)),
        None => (lo, hi),
    }
}

fn draw(
    path: &Path,
    title: &str,
    y_label: &str,
    points: &[(f64, f64)],
    bounds: Option<(f64, f64)>,
) -> Result<()> {
    let fail = |e: String| Error::file(path, format!("cannot draw plot: {e}"));
    // Epochs count from 1: half an epoch of room on the right.
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max) + 0.5;
    let (y_lo, y_hi) = y_range(points, bounds);
    // Drawn into memory and written atomically (a stream or a link is written as such).
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, y_lo..y_hi)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_label)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    crate::fsutil::write_file_atomically(path, svg.as_bytes())
}

/// Writes `RUN/plots/<stage>_loss.svg` and, when present, `<stage>_val_accuracy.svg` and
/// `<stage>_knn_accuracy.svg` (the SSL stage's probe).
pub fn plot_stage(run_dir: &Path, stage: &str) -> Result<Vec<PathBuf>> {
    let metrics = run_dir.join("metrics.jsonl");
    let dir = run_dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut written = Vec::new();
    for (key, label, file, bounds) in [
        ("loss", "training loss", format!("{stage}_loss.svg"), None),
        (
            "val_accuracy",
            "PublicTest accuracy",
            format!("{stage}_val_accuracy.svg"),
            Some((0.0, 1.0)),
        ),
        (
            "knn_accuracy",
            "kNN accuracy on PublicTest",
            format!("{stage}_knn_accuracy.svg"),
            Some((0.0, 1.0)),
        ),
    ] {
        let points = series(&metrics, stage, key)?;
        if points.is_empty() {
            continue;
        }
        let path = dir.join(file);
        draw(&path, &format!("{stage}: {label}"), label, &points, bounds)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    /// Axes fit the data: one accuracy of 0.2 is drawn on 0.19..0.21, not -0.3..0.7; a range
    /// near 1 stops at 1; a loss keeps its padded range.
    #[test]
    fn axes_fit_the_data() {
        let (lo, hi) = y_range(&[(1.0, 0.2)], Some((0.0, 1.0)));
        assert!(
            (lo - 0.19).abs() < 1e-9 && (hi - 0.21).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert_eq!(y_range(&[(1.0, 0.9), (2.0, 1.0)], Some((0.0, 1.0))).1, 1.0);
        let (lo, hi) = y_range(&[(1.0, 1.0), (2.0, 3.0)], None);
        assert!(
            (lo - 0.9).abs() < 1e-9 && (hi - 3.1).abs() < 1e-9,
            "{lo} {hi}"
        );
        let (lo, hi) = y_range(&[(1.0, 0.0)], Some((0.0, 1.0)));
        assert!(lo == 0.0 && (hi - 0.01).abs() < 1e-9, "{lo} {hi}");
    }

    use super::*;

    #[test]
    fn plots_from_the_metrics_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = "{\"stage\":\"classifier\",\"epoch\":1,\"loss\":2.0,\"val_accuracy\":0.3}\n\
                   {\"stage\":\"classifier\",\"epoch\":2,\"loss\":1.5,\"val_accuracy\":0.4}\n\
                   {\"stage\":\"ssl\",\"epoch\":1,\"loss\":900.0,\"val_accuracy\":null}\n\
                   {\"stage\":\"card\",\"epoch\":1,\"loss\":0.5,\"knn_accuracy\":null}\n";
        std::fs::write(dir.path().join("metrics.jsonl"), log).unwrap();
        let w = plot_stage(dir.path(), "classifier").unwrap();
        assert_eq!(w.len(), 2);
        let svg = std::fs::read_to_string(&w[0]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("classifier: training loss"));
        assert_eq!(plot_stage(dir.path(), "ssl").unwrap().len(), 1);
        assert_eq!(plot_stage(dir.path(), "card").unwrap().len(), 1);
        // The SSL stage's probe gets its own plot.
        let log = "{\"stage\":\"ssl\",\"epoch\":1,\"loss\":900.0,\"knn_accuracy\":0.31}\n";
        std::fs::write(dir.path().join("metrics.jsonl"), log).unwrap();
        let w = plot_stage(dir.path(), "ssl").unwrap();
        assert_eq!(w.len(), 2);
        assert!(std::fs::read_to_string(&w[1])
            .unwrap()
            .contains("kNN accuracy on PublicTest"));
    }
}
