//! `fer-cam average`, `fer-cam calibrate` and `fer-cam export`: the steps between trained runs
//! and a shipped model (average the last cycles' weights, fit the sampler's temperature, then
//! write the model with it and with f16 weights).

use anyhow::{bail, Result};

use crate::cli::{AverageArgs, CalibrateArgs, ExportArgs, StoredWeightsArg};
use fer_cam::calibrate::{calibrate as fit, reliability_svg, Samples};
use fer_cam::model::average::average_models;
use fer_cam::model::export::{export_model, StoredWeights};

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
    let calibrations = a
        .calibration
        .iter()
        .map(|p| fer_cam::calibrate::read_calibration(p))
        .collect::<fer_cam::Result<Vec<_>>>()?;
    let weights = match a.weights {
        StoredWeightsArg::F16 => StoredWeights::F16,
        StoredWeightsArg::F32 => StoredWeights::F32,
    };
    let s = export_model(&a.model, &a.out, weights, &calibrations)?;
    super::print_stdout(&format!(
        "wrote {}: {} tensors ({} as f16), {:.2} MB, sampler temperatures τ {:.4}, T {:.4}, \
         test-time views {}",
        a.out.display(),
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
