//! `fer-cam average`, `fer-cam calibrate` and `fer-cam export`: the steps between trained runs
//! and a shipped model (average the last cycles' weights, fit the sampler's temperature, then
//! write the model with it and with f16 weights); and the same steps as the end of `train all`
//! where the recipe asks for them ([`ship_run`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::cli::{AverageArgs, CalibrateArgs, DataSource, ExportArgs, StoredWeightsArg};
use fer_cam::calibrate::{calibrate as fit, reliability_svg, Samples};
use fer_cam::model::average::average_models;
use fer_cam::model::export::{export_model, StoredWeights};
use fer_cam::train::{ShipConfig, TrainConfig};

/// Most reliability bins `calibrate` draws and writes (a diagram of more bins than faces says
/// nothing, and each bin is a row of the JSON).
pub const MAX_BINS: usize = 1000;

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    if a.batch_size == 0 || !(1..=MAX_BINS).contains(&a.bins) {
        bail!("--batch-size must be at least 1 and --bins 1..={MAX_BINS}");
    }
    if a.out.extension().is_none_or(|e| e != "json") {
        bail!("--out {} (must end in .json)", a.out.display());
    }
    let svg = a.out.with_extension("svg");
    if !a.force {
        for p in [&a.out, &svg] {
            if p.exists() {
                bail!(
                    "{} already exists (pass --force to replace it)",
                    p.display()
                );
            }
        }
    }
    // Its folder is made (as the write would) so that the check below can try it.
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    for p in [&a.out, &svg] {
        super::check_output(p, &a.classifier, &a.source.data)?;
    }
    let mut clf = super::load_classifier(&a.classifier)?;
    let (data, _) = super::load_split(&a.source, &a.split, None)?;
    if data.class_names != clf.config().classes {
        bail!(
            "the data's classes [{}] differ from the model's [{}]",
            data.class_names.join(", "),
            clf.config().classes.join(", ")
        );
    }
    let bar = super::progress_bar(a.quiet, data.len(), format!("sample {}", a.split))?;
    let samples = Samples::draw(&mut clf, &data, a.batch_size, |d| {
        bar.set_position(d as u64)
    })?;
    bar.finish_and_clear();
    let mut report = fit(&samples, clf.temperatures(), a.bins);
    report.model = super::model_name(a.classifier.model.as_deref());
    report.data = a.source.data.display().to_string();
    report.split = a.split.clone();
    report.steps = clf.sampler().steps;
    report.seed = a.classifier.seed;
    report.tta = clf.tta();
    super::write_json(&a.out, &report, a.force)?;
    reliability_svg(&report, &svg, a.force)?;
    super::print_stdout(&format!(
        "{} [{}], {} images, {} samples x {} steps, test-time views {}\n\
         temperature (per sample) {:.4} -> {:.4}\n\
         output temperature {:.4} -> {:.4}\n\
         ECE {:.4} -> {:.4} ({} bins)\n\
         NLL {:.4} -> {:.4}\n\
         wrote {} and {}",
        report.data,
        report.split,
        report.images,
        report.samples,
        report.steps,
        report.tta.name(),
        report.temperature_before,
        report.temperature,
        report.output_temperature_before,
        report.output_temperature,
        report.ece_before,
        report.ece_after,
        report.ece_bins,
        report.nll_before,
        report.nll_after,
        a.out.display(),
        svg.display()
    ))
}

pub fn export(a: ExportArgs) -> Result<()> {
    let weights = match a.weights {
        StoredWeightsArg::F16 => StoredWeights::F16,
        StoredWeightsArg::F32 => StoredWeights::F32,
    };
    export_to(&a.model, &a.out, weights, &a.calibration)
}

/// `export`'s work: `model` written to the new directory `out` with `weights` and the
/// temperatures of the `calibration` files (the first one's views the default).
fn export_to(
    model: &Path,
    out: &Path,
    weights: StoredWeights,
    calibration: &[PathBuf],
) -> Result<()> {
    let calibrations = calibration
        .iter()
        .map(|p| fer_cam::calibrate::read_calibration(p))
        .collect::<fer_cam::Result<Vec<_>>>()?;
    let s = export_model(model, out, weights, &calibrations)?;
    super::print_stdout(&format!(
        "wrote {}: {} tensors ({} as f16), {:.2} MB, sampler temperatures τ {:.4}, T {:.4}, \
         test-time views {}",
        out.display(),
        s.tensors,
        s.tensors_f16,
        s.bytes as f64 / 1e6,
        s.temperatures.sample,
        s.temperatures.output,
        s.tta.name()
    ))
}

pub fn average(a: AverageArgs) -> Result<()> {
    let srcs: Vec<&std::path::Path> = a.model.iter().map(|p| p.as_path()).collect();
    let s = average_models(&srcs, &a.out)?;
    super::print_stdout(&format!(
        "wrote {}: the mean of {} models, {} tensors (f32), {:.2} MB",
        a.out.display(),
        s.models,
        s.tensors,
        s.bytes as f64 / 1e6
    ))
}

/// The recipe's `ship` steps after `train all`'s last model (its CARD stage's, or its last
/// cycle's), into `RUN/ship/`: `calibrate` on PublicTest under each of `ship.tta`'s views (every
/// other option at the command's default: sampler seed 0, f16 inference weights, ...), then
/// `export` with all of them. A step whose output exists is skipped (said on stderr), so a
/// resumed run finishes where it stopped.
pub fn ship_run(
    cfg: &TrainConfig,
    ship: &ShipConfig,
    source: &DataSource,
    device: &str,
) -> Result<()> {
    let dir = cfg.run_dir.join("ship");
    let card = cfg.final_model();
    let mut calibrations = Vec::new();
    for &tta in &ship.tta {
        let out = dir.join(format!("calibration-{}.json", tta.name()));
        if out.exists() {
            fer_cam::log!("ship: {} exists (an earlier run's): kept", out.display());
        } else {
            let mut a = CalibrateArgs::with_defaults(&cfg.data, &out)?;
            a.classifier.model = Some(card.clone());
            a.classifier.device = device.to_string();
            a.classifier.tta = Some(tta.into());
            a.source.no_cache = source.no_cache;
            a.source.cache_dir = source.cache_dir.clone();
            a.source.labels = cfg.labels.clone();
            a.source.labels_unverified = cfg.labels_unverified;
            a.split = "PublicTest".into();
            a.quiet = true;
            calibrate(a)?;
        }
        calibrations.push(out);
    }
    let out = dir.join("model");
    if out.exists() {
        fer_cam::log!("ship: {} exists (an earlier run's): kept", out.display());
        return Ok(());
    }
    export_to(&card, &out, ship.weights, &calibrations)
}
