//! `fer-cam train`: the command-line overrides on a training config, a progress bar, and the
//! per-stage summary.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{device, load_options, print_stdout};
use crate::cli::{TrainArgs, TrainStage};
use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .context("progress bar template")?,
    );
    // One bar per stage over all its steps (epochs × steps), reset when the next stage starts;
    // the ETA is the median of the last steps' times × the steps left.
    let mut clock = StepClock::default();
    let mut stage = None;
    let mut progress = |p: &Progress| {
        let (done, total) = (p.epoch * p.steps + p.step, p.epochs * p.steps);
        if stage != Some(p.stage) {
            stage = Some(p.stage);
            clock = StepClock::default();
            bar.reset();
            bar.set_length(total as u64);
        }
        bar.set_position(done as u64);
        let eta = match clock.tick() {
            Some(step_s) => {
                let left = (step_s * total.saturating_sub(done) as f64).round() as u64;
                format!(
                    ", stage eta {}",
                    humantime::format_duration(Duration::from_secs(left))
                )
            }
            None => String::new(),
        };
        bar.set_message(format!(
            "{} epoch {}/{} loss {:.4} {:.1} img/s{eta}",
            p.stage.name(),
            p.epoch + 1,
            p.epochs,
            p.loss,
            p.images_per_s
        ));
    };
    // Lines on what happens between steps, also when stderr is not a terminal (a log file),
    // where the bar does not draw.
    let quiet = a.quiet;
    let mut note = |line: &str| {
        if !quiet {
            bar.suspend(|| fer_cam::log!("{line}"));
        }
    };
    // SIGINT / SIGTERM: the stage stops before its next step; the last epoch's checkpoint stays.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut monitor = Monitor {
        progress: &mut progress,
        note: &mut note,
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
    print_stdout(text.trim_end())?;
    match &cfg.ship {
        Some(ship) if matches!(a.stage, TrainStage::All) => {
            super::ship::ship_run(&cfg, ship, &a.source, &a.device)
        }
        _ => Ok(()),
    }
}

/// The time a training step takes, for the ETA: the median of the last [`StepClock::WINDOW`]
/// gaps between steps, so that one slow gap (validation between epochs, a checkpoint) does not
/// swing it, and no estimate until a few steps have been timed.
#[derive(Default)]
struct StepClock {
    last: Option<Instant>,
    gaps: VecDeque<f64>,
}

impl StepClock {
    const WINDOW: usize = 64;
    const FIRST: usize = 5;

    /// Records a step now; the median step time in seconds once [`Self::FIRST`] are timed.
    fn tick(&mut self) -> Option<f64> {
        let now = Instant::now();
        if let Some(last) = self.last.replace(now) {
            self.push((now - last).as_secs_f64());
        }
        self.median()
    }

    fn push(&mut self, gap: f64) {
        if self.gaps.len() == Self::WINDOW {
            self.gaps.pop_front();
        }
        self.gaps.push_back(gap);
    }

    fn median(&self) -> Option<f64> {
        if self.gaps.len() < Self::FIRST {
            return None;
        }
        let mut v: Vec<f64> = self.gaps.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::StepClock;

    /// The ETA's step time ignores a rare slow gap (an epoch's validation) and follows a lasting
    /// change of pace within a window.
    #[test]
    fn step_time_is_a_robust_moving_median() {
        let mut c = StepClock::default();
        for _ in 0..4 {
            c.push(1.0);
        }
        assert_eq!(c.median(), None, "no estimate from four steps");
        c.push(1.0);
        assert_eq!(c.median(), Some(1.0));
        c.push(120.0);
        assert_eq!(c.median(), Some(1.0), "one validation gap");
        for _ in 0..StepClock::WINDOW {
            c.push(2.0);
        }
        assert_eq!(c.median(), Some(2.0));
        assert_eq!(c.gaps.len(), StepClock::WINDOW);
    }
}
