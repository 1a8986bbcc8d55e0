//! `fer-cam eval`: accuracy, PAvPU, calibration and confusion of a model on a labelled split.

use anyhow::{bail, Result};

use super::{
    check_not_an_input, load_classifier, load_split, model_name, print_stdout, progress_bar,
    write_json,
};
use crate::cli::EvalArgs;
use fer_cam::eval::{evaluate, EvalOptions};

pub fn eval(a: EvalArgs) -> Result<()> {
    if let Some(path) = &a.json {
        check_not_an_input(path, &a.classifier, &a.source.data)?;
    }
    let mut clf = load_classifier(&a.classifier)?;
    if a.batch_size == 0 {
        bail!("--batch-size 0 (must be at least 1)");
    }
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold {} (allowed 0..=1)", a.threshold);
    }
    let split = load_split(&a.source, &a.split, a.limit)?;
    let bar = progress_bar(a.quiet, split.len(), format!("eval {}", a.split))?;
    let opts = EvalOptions {
        batch_size: a.batch_size,
        threshold: a.threshold,
        ..Default::default()
    };
    let mut report = evaluate(&mut clf, &split, &opts, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    report.model = model_name(a.classifier.model.as_deref());
    report.data = a.source.data.display().to_string();
    report.split = a.split.clone();
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    print_stdout(&report.to_string())
}
