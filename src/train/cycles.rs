//! The recipe's warm restarts of the supervised stage ([`CycleConfig`]), run by `train all` after
//! its CARD stage: each cycle in a run directory of its own under the recipe's, from the model
//! before it, optionally distilled from that model and averaged with it. Everything a cycle needs
//! comes from the run itself, so a recipe with cycles rebuilds its model with one command.

use std::path::Path;

use candle_core::Device;

use super::{
    has_begun, model_dir, open_run_dir, train_card, train_classifier, CycleConfig, Monitor, Stage,
    StageSelection, StageSummary, TrainConfig, TrainData,
};
use crate::error::Result;

/// Runs `cfg.cycles` in order after the recipe's CARD stage (`RUN/card/model` must exist). A
/// cycle (or soup) that has begun is continued when `resume` is set, and skipped stage by stage
/// when finished; one that has not begun starts afresh.
pub(super) fn run_cycles(
    cfg: &TrainConfig,
    data: &TrainData,
    dev: &Device,
    resume: bool,
    monitor: &mut Monitor,
) -> Result<Vec<StageSummary>> {
    let mut out = Vec::new();
    // The model the next cycle starts from, as a run directory with classifier/ and card/.
    let mut prev = cfg.run_dir.clone();
    for (i, cycle) in cfg.cycles.iter().enumerate() {
        let sub = cycle_config(cfg, cycle, i, &prev);
        let stages = [Stage::Classifier, Stage::Card];
        let go_on = resume && has_begun(&sub.run_dir, &stages);
        let _lock = open_run_dir(&sub, StageSelection::All, go_on)?;
        (monitor.note)(&format!(
            "cycle {} of {} ({}): f_φ from {}{}",
            i + 1,
            cfg.cycles.len(),
            sub.run_dir.display(),
            prev.display(),
            match &sub.classifier.distill {
                Some(d) => format!(
                    ", distilled from {}",
                    d.teachers()
                        .map(|t| t.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
                None => String::new(),
            }
        ));
        let start = model_dir(&prev, Stage::Classifier);
        out.push(train_classifier(
            &sub,
            data,
            Some(&start),
            dev,
            go_on,
            monitor,
        )?);
        let trained = model_dir(&sub.run_dir, Stage::Classifier);
        out.push(train_card(&sub, data, &trained, dev, go_on, monitor)?);
        prev = if cycle.average {
            let soup = TrainConfig {
                run_dir: cfg.cycle_dir(i, true),
                ..sub
            };
            out.push(average_and_train_card(
                &soup, data, &start, &trained, dev, resume, monitor,
            )?);
            soup.run_dir
        } else {
            sub.run_dir
        };
    }
    Ok(out)
}

/// The training config of cycle `i`, starting from (and where it distils, taught by) the model
/// in the run directory `prev`.
fn cycle_config(cfg: &TrainConfig, cycle: &CycleConfig, i: usize, prev: &Path) -> TrainConfig {
    let mut classifier = cycle.classifier.clone();
    classifier.init = Some(model_dir(prev, Stage::Classifier));
    classifier.distill = cycle
        .distill
        .as_ref()
        .map(|d| d.from_teacher(model_dir(prev, Stage::Card)));
    TrainConfig {
        run_dir: cfg.cycle_dir(i, false),
        classifier,
        card: cycle.card.clone(),
        cycles: Vec::new(),
        ship: None,
        ..cfg.clone()
    }
}

/// The soup in `soup.run_dir`: the mean of f_φ in `a` and `b` as its classifier model (written
/// once), then a CARD head on the mean's frozen encoder.
fn average_and_train_card(
    soup: &TrainConfig,
    data: &TrainData,
    a: &Path,
    b: &Path,
    dev: &Device,
    resume: bool,
    monitor: &mut Monitor,
) -> Result<StageSummary> {
    let go_on = resume && has_begun(&soup.run_dir, &[Stage::Card]);
    let _lock = open_run_dir(soup, StageSelection::Card, go_on)?;
    let mean = model_dir(&soup.run_dir, Stage::Classifier);
    if !mean.exists() {
        (monitor.note)(&format!(
            "soup: the mean of {} and {}",
            a.display(),
            b.display()
        ));
        crate::model::average::average_models(&[a, b], &mean)?;
    }
    train_card(soup, data, &mean, dev, go_on, monitor)
}
