//! `fer-cam train`: the command-line overrides on a training config, a progress bar, and the
//! per-stage summary.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{device, load_options, print_stdout};
use crate::cli::{TrainArgs, TrainStage};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use fer_cam::train::{Monitor, Progress, StageSelection, TrainConfig};

pub fn train(a: TrainArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let mut cfg = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<TrainConfig>(&text)
                .with_context(|| format!("{}: not a valid training config", p.display()))?
        }
        None => TrainConfig::new(a.source.data.clone(), a.run_dir.clone()),
    };
    a.apply_to(&mut cfg, load_options(&a.source).cache_dir)?;
    let selection = match a.stage {
        TrainStage::Ssl => StageSelection::Ssl,
        TrainStage::Classifier => StageSelection::Classifier,
        TrainStage::Card => StageSelection::Card,
        TrainStage::All => StageSelection::All,
    };
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
        )
        .context("progress bar template")?,
    );
    let mut progress = |p: &Progress| {
        bar.set_length(p.steps as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!(
            "{} epoch {}/{} loss {:.4} {:.1} img/s",
            p.stage.name(),
            p.epoch + 1,
            p.epochs,
            p.loss,
            p.images_per_s
        ));
    };
    // SIGINT / SIGTERM: the stage stops before its next step; the last epoch's checkpoint stays.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut monitor = Monitor {
        progress: &mut progress,
        stop: &stop,
    };
    let summaries = fer_cam::train::run(
        &cfg,
        selection,
        a.init.as_deref(),
        a.from_scratch,
        &dev,
        a.resume,
        &mut monitor,
    );
    bar.finish_and_clear();
    let summaries = summaries?;
    let mut text = String::new();
    for s in &summaries {
        if s.images_per_s > 0.0 {
            text += &format!(
                "{}: {} epochs, {:.1} images/s, {:.1}% of the time waiting for data",
                s.stage,
                s.epochs_run,
                s.images_per_s,
                100.0 * s.data_wait_share
            );
        } else {
            text += &format!(
                "{}: {} epochs (all done in an earlier run)",
                s.stage, s.epochs_run
            );
        }
        if let (Some(acc), Some(ep)) = (s.best_val_accuracy, s.best_epoch) {
            text += &format!(", PublicTest accuracy {:.2}% (epoch {ep})", 100.0 * acc);
        }
        text += &format!(", model {}\n", s.model_dir.display());
    }
    print_stdout(text.trim_end())
}
