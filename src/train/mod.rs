//! `fer-cam train`: Barlow Twins self-supervision → supervised f_φ → CARD diffusion head.
//!
//! Each stage writes a model directory (`RUN/<stage>/model`) that `eval` and the daemon load, and
//! a checkpoint (`RUN/<stage>/checkpoint`: weights, optimizer moments, state with the full
//! config) after every epoch, atomically, so `--resume` continues exactly where a killed run left
//! off. Metrics go to `RUN/metrics.jsonl`. Splits: train on Training; PublicTest chooses the best
//! epoch; PrivateTest is never read here.

pub mod card_batch;
mod checkpoint;
mod config;
mod cycles;
mod epochs;
mod loader;
pub mod optim;
pub mod plots;
mod probe;
mod stages;
mod targets;
mod teacher;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;

use crate::data::{self, Dataset, LoadOptions};
use crate::error::{Error, Result};
use crate::fsutil::write_file_atomically;
use checkpoint::checkpoint_dir;
pub use checkpoint::{model_dir, stage_dir};
pub use config::{
    CardTrainConfig, CardY0, ClassifierConfig, Consistency, CycleConfig, CycleDistill,
    DistillConfig, Keep, ShipConfig, SslConfig, StageConfig, Targets, TrainConfig,
};
pub use loader::mix_seed;
pub use stages::{smoothed_cross_entropy, train_card, train_classifier, train_ssl};

/// The three stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ssl,
    Classifier,
    Card,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ssl => "ssl",
            Stage::Classifier => "classifier",
            Stage::Card => "card",
        }
    }

    pub(crate) fn id(self) -> u64 {
        self as u64 + 1
    }
}

/// What the caller sees of a running stage, and how it stops one: `progress` after every step;
/// `note` a line on what training does between steps (loading data, starting a stage, computing
/// features, each epoch's result), so that no long wait passes without a word; `stop` (set from
/// a signal handler) ends the stage before its next step, with an error that names the
/// checkpoint `--resume` continues from.
pub struct Monitor<'a> {
    pub progress: &'a mut dyn FnMut(&Progress),
    pub note: &'a mut dyn FnMut(&str),
    pub stop: &'a std::sync::atomic::AtomicBool,
}

impl Monitor<'_> {
    /// Whether a stop was asked for (checked between steps and batches).
    pub fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// For a pass over the data before a stage's epochs (a teacher's answers, CARD's features),
    /// checked between batches: when a stop was asked for, the error that ends `stage` there,
    /// saying what was under way (`doing`) and how far it got.
    pub fn check_pass(&self, stage: Stage, doing: &str, done: usize, total: usize) -> Result<()> {
        if !self.stopped() {
            return Ok(());
        }
        Err(Error::Msg(format!(
            "stage {} interrupted {doing}, after {done} of {total} images; they are not kept, \
             and the stage's checkpoint is as it was: continue with --resume",
            stage.name()
        )))
    }
}

/// A progress report, sent after every step.
#[derive(Debug, Clone)]
pub struct Progress {
    pub stage: Stage,
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub images_per_s: f64,
}

/// What a finished stage reports.
#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    pub stage: &'static str,
    pub epochs_run: usize,
    pub images_per_s: f64,
    /// Share of the stage's wall time spent waiting for the loader.
    pub data_wait_share: f64,
    /// PublicTest accuracy of the kept model (f_φ for `classifier`, CARD vote for `card`).
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<usize>,
    pub model_dir: PathBuf,
}

/// Training and validation data, loaded once.
pub struct TrainData {
    pub train: Arc<Dataset>,
    pub val: Arc<Dataset>,
    /// Extra unlabeled images for the SSL stage (label fields meaningless).
    pub unlabeled: Arc<Dataset>,
}

impl TrainData {
    /// Loads Training and PublicTest from `cfg.data` (and SSL's extra folders). Never PrivateTest.
    pub fn load(cfg: &TrainConfig) -> Result<Self> {
        let opts = LoadOptions {
            cache_dir: cfg.cache_dir.clone(),
        };
        let (mut all, _) = data::load(&cfg.data, &opts)?;
        if let Some(path) = &cfg.labels {
            all = data::ferplus::relabel(&all, path, !cfg.labels_unverified)?.0;
        }
        let needs_votes = cfg.classifier.targets != Targets::Label || cfg.card.y0 != CardY0::OneHot;
        if needs_votes && all.soft.is_empty() {
            return Err(Error::Config(
                "the recipe learns from votes (classifier.targets or card.y0), and the data has none: pass --labels VOTES.csv".into(),
            ));
        }
        if all.class_names != cfg.model.classes {
            return Err(Error::Config(format!(
                "the data's classes [{}] differ from the model config's [{}]",
                all.class_names.join(", "),
                cfg.model.classes.join(", ")
            )));
        }
        let limit = |d: Dataset, n: Option<usize>| match n {
            Some(n) => d.select(|i| i < n),
            None => d,
        };
        let train = limit(all.select_split("Training")?, cfg.train_limit);
        let val = limit(all.select_split("PublicTest")?, cfg.val_limit);
        let mut unlabeled = train.clone();
        for extra in &cfg.ssl.extra_images {
            let (d, _) = data::load(extra, &opts)?;
            unlabeled.pixels.extend_from_slice(&d.pixels);
            unlabeled.labels.extend(std::iter::repeat_n(0, d.len()));
            unlabeled.splits.extend(std::iter::repeat_n(0, d.len()));
        }
        if train.len() < 2 || val.is_empty() {
            return Err(Error::Config(format!(
                "need at least 2 Training and 1 PublicTest images (have {} and {})",
                train.len(),
                val.len()
            )));
        }
        Ok(Self {
            train: Arc::new(train),
            val: Arc::new(val),
            unlabeled: Arc::new(unlabeled),
        })
    }
}

/// Appends one JSON object per line to `RUN/metrics.jsonl`.
fn log_metrics(run_dir: &Path, value: serde_json::Value) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    writeln!(f, "{value}").map_err(|e| Error::io(&path, e))
}

/// Which stages `fer-cam train` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageSelection {
    Ssl,
    Classifier,
    Card,
    All,
}

/// Holds `RUN/.lock` for the life of the returned file: a second `train` on the same run
/// directory is refused instead of interleaving checkpoints with the first.
fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Config(format!(
            "{}: another `fer-cam train` is using this run directory",
            run_dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// A run directory must be new, empty, or one `fer-cam train` made (its `config.json` is a
/// training config): training writes `config.json`, `metrics.jsonl` and `plots/` there, and must
/// not replace or append to a user's own files of those names.
fn check_run_dir_is_ours(run_dir: &Path) -> Result<()> {
    let Ok(meta) = run_dir.symlink_metadata() else {
        return Ok(());
    };
    let refuse = |why: &str| {
        Err(Error::Config(format!(
            "--run-dir {} {why}; use a new directory",
            run_dir.display()
        )))
    };
    if !meta.is_dir() {
        return refuse("exists and is not a directory");
    }
    let config = run_dir.join("config.json");
    if config.symlink_metadata().is_ok() {
        let ours = crate::fsutil::read_regular(&config, 1 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.get("run_dir").is_some() && v.get("model").is_some());
        if !ours {
            return refuse("holds a config.json that is not a fer-cam training config");
        }
        return Ok(());
    }
    let entries = std::fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))?;
    for e in entries {
        let name = e.map_err(|e| Error::io(run_dir, e))?.file_name();
        if name != ".lock" {
            return refuse(&format!(
                "is not empty ({}) and is not a fer-cam run directory",
                name.to_string_lossy()
            ));
        }
    }
    Ok(())
}

/// Refuses, before anything in `run_dir` is written, a fresh start over an existing checkpoint
/// (that needs `--resume`) and a `--resume` with nothing to resume (which would silently start
/// over). Repairs a checkpoint interrupted between its two renames first.
fn check_run_dir(run_dir: &Path, selection: StageSelection, resume: bool) -> Result<()> {
    let stages: &[Stage] = match selection {
        StageSelection::Ssl => &[Stage::Ssl],
        StageSelection::Classifier => &[Stage::Classifier],
        StageSelection::Card => &[Stage::Card],
        StageSelection::All => &[Stage::Ssl, Stage::Classifier, Stage::Card],
    };
    let mut found = false;
    for &stage in stages {
        let ck = checkpoint_dir(run_dir, stage);
        crate::fsutil::recover_dir(&ck)?;
        let has = has_begun(run_dir, &[stage]);
        if has && !resume && ck.join("state.json").exists() {
            return Err(Error::Config(format!(
                "{} holds a checkpoint of stage {}: pass --resume to continue it, or use a new --run-dir",
                ck.display(),
                stage.name()
            )));
        }
        found |= has;
    }
    if resume && !found {
        return Err(Error::Config(format!(
            "--resume: {} has no checkpoint or model of the selected stage(s) to continue",
            run_dir.display()
        )));
    }
    Ok(())
}

/// `--resume` continues only on the data (and labels) the run started on, as its `config.json`
/// records them: other data would silently mix two trainings.
fn check_same_data(cfg: &TrainConfig) -> Result<()> {
    let path = cfg.run_dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let Ok(before) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let same = |was: Option<&str>, now: Option<&Path>| -> bool {
        match (was, now) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                let (a, b) = (Path::new(a), b);
                a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
            }
            _ => false,
        }
    };
    for (key, now) in [
        ("data", Some(cfg.data.as_path())),
        ("labels", cfg.labels.as_deref()),
    ] {
        let was = before.get(key).and_then(|v| v.as_str());
        if !same(was, now) {
            return Err(Error::Config(format!(
                "--resume: {} was started with {key} {}, not {}; resume it with the same {key}, \
                 or start a new --run-dir",
                cfg.run_dir.display(),
                was.unwrap_or("(none)"),
                now.map_or("(none)".into(), |p| p.display().to_string())
            )));
        }
    }
    Ok(())
}

/// Runs the selected stage(s). `init` overrides where `classifier` (an SSL model) and `card` (a
/// classifier model) start from; by default they use the previous stage's output in the run
/// directory, and `classifier` starts from scratch when there is none (the "no SSL" ablation
/// with `--from-scratch`).
pub fn run(
    cfg: &TrainConfig,
    selection: StageSelection,
    init: Option<&Path>,
    from_scratch: bool,
    dev: &Device,
    resume: bool,
    monitor: &mut Monitor,
) -> Result<Vec<StageSummary>> {
    cfg.validate()?;
    let _lock = open_run_dir(cfg, selection, resume)?;
    (monitor.note)(&format!(
        "loading {}",
        crate::log::escape(&cfg.data.to_string_lossy())
    ));
    let t0 = std::time::Instant::now();
    let data = TrainData::load(cfg)?;
    (monitor.note)(&format!(
        "{} training and {} PublicTest images ({:.1} s)",
        data.train.len(),
        data.val.len(),
        t0.elapsed().as_secs_f64()
    ));
    let mut out = Vec::new();
    let ssl_model = model_dir(&cfg.run_dir, Stage::Ssl);
    let cls_model = model_dir(&cfg.run_dir, Stage::Classifier);
    let recipe_init = cfg.classifier.init.as_deref();
    if selection == StageSelection::Ssl
        || (selection == StageSelection::All && !from_scratch && recipe_init.is_none())
    {
        out.push(train_ssl(cfg, &data, dev, resume, monitor)?);
    }
    if matches!(selection, StageSelection::Classifier | StageSelection::All) {
        let start = if from_scratch {
            None
        } else if let Some(i) = init.filter(|_| selection == StageSelection::Classifier) {
            Some(i.to_path_buf())
        } else if let Some(i) = recipe_init {
            Some(i.to_path_buf())
        } else {
            ssl_model.exists().then_some(ssl_model.clone())
        };
        out.push(train_classifier(
            cfg,
            &data,
            start.as_deref(),
            dev,
            resume,
            monitor,
        )?);
    }
    if matches!(selection, StageSelection::Card | StageSelection::All) {
        let start = match init.filter(|_| selection == StageSelection::Card) {
            Some(i) => i.to_path_buf(),
            None => cls_model.clone(),
        };
        if !start.exists() {
            return Err(Error::Config(format!(
                "card needs a trained classifier: {} does not exist (run `train classifier` first or pass --init)",
                start.display()
            )));
        }
        out.push(train_card(cfg, &data, &start, dev, resume, monitor)?);
    }
    if selection == StageSelection::All {
        out.extend(cycles::run_cycles(cfg, &data, dev, resume, monitor)?);
    }
    Ok(out)
}

/// Makes `cfg.run_dir` ready for the selected stages and holds its lock (for the life of the
/// returned file): new or made by `fer-cam train`, no checkpoint started over without `resume`
/// and none resumed from other data, and its `config.json` written.
fn open_run_dir(
    cfg: &TrainConfig,
    selection: StageSelection,
    resume: bool,
) -> Result<std::fs::File> {
    check_run_dir_is_ours(&cfg.run_dir)?;
    std::fs::create_dir_all(&cfg.run_dir).map_err(|e| Error::io(&cfg.run_dir, e))?;
    let lock = lock_run_dir(&cfg.run_dir)?;
    check_run_dir(&cfg.run_dir, selection, resume)?;
    if resume {
        check_same_data(cfg)?;
    }
    let json = serde_json::to_string_pretty(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    write_file_atomically(&cfg.run_dir.join("config.json"), json.as_bytes())?;
    Ok(lock)
}

/// Whether `run_dir` holds a checkpoint or a model of one of `stages` (a begun stage).
fn has_begun(run_dir: &Path, stages: &[Stage]) -> bool {
    stages.iter().any(|&s| {
        checkpoint_dir(run_dir, s).join("state.json").exists() || model_dir(run_dir, s).exists()
    })
}
