//! `fer-cam train`: Barlow Twins self-supervision → supervised f_φ → CARD diffusion head.
//!
//! Each stage writes a model directory (`RUN/<stage>/model`) that `eval` and the daemon load, and
//! a checkpoint (`RUN/<stage>/checkpoint`: weights, optimizer moments, state with the full
//! config) after every epoch, atomically, so `--resume` continues exactly where a killed run left
//! off. Metrics go to `RUN/metrics.jsonl`. Splits: train on Training; PublicTest chooses the best
//! epoch; PrivateTest is never read here.

pub mod card_batch;
mod loader;
pub mod optim;
pub mod plots;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::augment::Augment;
use crate::data::{self, Dataset, LoadOptions, FACE_PIXELS};
use crate::error::{Error, Result};
use crate::fsutil::{write_dir_atomically, write_file_atomically};
use crate::metrics;
use crate::model::barlow::{barlow_twins_loss, Projector};
use crate::model::{sample_probs, seeded_init, write_model_files, FerModel};
use card_batch::CardBatch;
pub use loader::mix_seed;
use loader::EpochPlan;
use optim::{warmup_cosine, AdamW};

/// One stage's optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub augment: Augment,
}

/// Barlow Twins settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    #[serde(flatten)]
    pub opt: StageConfig,
    /// Projector widths (the last is the embedding size).
    pub projector: Vec<usize>,
    pub lambda: f64,
    /// Extra unlabeled image folders (any layout; labels ignored).
    #[serde(default)]
    pub extra_images: Vec<PathBuf>,
}

/// Supervised f_φ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    #[serde(flatten)]
    pub opt: StageConfig,
    pub label_smoothing: f64,
}

/// CARD ε_θ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardTrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Samples per image when scoring PublicTest after each epoch.
    pub val_samples: usize,
}

/// Everything a training run needs; saved beside every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub model: ModelConfig,
    pub ssl: SslConfig,
    pub classifier: ClassifierConfig,
    pub card: CardTrainConfig,
    /// Use only the first N Training rows / PublicTest rows (CI-sized runs).
    pub train_limit: Option<usize>,
    pub val_limit: Option<usize>,
    /// Dataset cache directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

impl TrainConfig {
    /// Defaults for a run on `data` writing to `run_dir`.
    pub fn new(data: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            data,
            run_dir,
            seed: 0,
            model: ModelConfig::default(),
            ssl: SslConfig {
                opt: StageConfig {
                    epochs: 10,
                    batch_size: 128,
                    lr: 1e-3,
                    weight_decay: 1e-4,
                    warmup_epochs: 1.0,
                    augment: Augment::ssl(),
                },
                projector: vec![2048, 2048, 2048],
                lambda: crate::model::barlow::DEFAULT_LAMBDA,
                extra_images: Vec::new(),
            },
            classifier: ClassifierConfig {
                opt: StageConfig {
                    epochs: 30,
                    batch_size: 64,
                    lr: 1e-3,
                    weight_decay: 0.05,
                    warmup_epochs: 1.0,
                    augment: Augment::supervised(),
                },
                label_smoothing: 0.1,
            },
            card: CardTrainConfig {
                epochs: 20,
                batch_size: 256,
                lr: 1e-3,
                weight_decay: 0.0,
                val_samples: 16,
            },
            train_limit: None,
            val_limit: None,
            cache_dir: None,
        }
    }

    /// Checks every value before anything runs.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        for (name, o) in [("ssl", &self.ssl.opt), ("classifier", &self.classifier.opt)] {
            if o.batch_size < 2 {
                return bad(format!(
                    "{name}.batch_size {} (must be >= 2 for batch-norm)",
                    o.batch_size
                ));
            }
            if !(o.lr > 0.0 && o.lr.is_finite()) {
                return bad(format!("{name}.lr {} (must be > 0)", o.lr));
            }
            if o.weight_decay.is_nan()
                || o.weight_decay < 0.0
                || o.warmup_epochs.is_nan()
                || o.warmup_epochs < 0.0
            {
                return bad(format!(
                    "{name}: weight_decay and warmup_epochs must be >= 0"
                ));
            }
            o.augment
                .validate()
                .map_err(|e| Error::Config(format!("{name}.{e}")))?;
        }
        if self.ssl.projector.is_empty() || self.ssl.projector.contains(&0) {
            return bad(format!(
                "ssl.projector {:?} (non-empty, no zero widths)",
                self.ssl.projector
            ));
        }
        if !(0.0..1.0).contains(&self.classifier.label_smoothing) {
            return bad(format!(
                "classifier.label_smoothing {} (allowed 0..1)",
                self.classifier.label_smoothing
            ));
        }
        let c = &self.card;
        if c.batch_size < 2 || !(c.lr > 0.0 && c.lr.is_finite()) || c.val_samples == 0 {
            return bad(format!(
                "card: batch_size {} (>= 2), lr {} (> 0), val_samples {} (>= 1)",
                c.batch_size, c.lr, c.val_samples
            ));
        }
        Ok(())
    }
}

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

    fn id(self) -> u64 {
        self as u64 + 1
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

/// Checkpoint state saved as `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    stage: String,
    epochs_done: usize,
    optimizer_steps: usize,
    best_val: Option<f64>,
    best_epoch: Option<usize>,
    config: TrainConfig,
}

/// The run directory's paths for a stage.
pub fn stage_dir(run_dir: &Path, stage: Stage) -> PathBuf {
    run_dir.join(stage.name())
}

/// Where a stage's model directory goes.
pub fn model_dir(run_dir: &Path, stage: Stage) -> PathBuf {
    stage_dir(run_dir, stage).join("model")
}

fn checkpoint_dir(run_dir: &Path, stage: Stage) -> PathBuf {
    stage_dir(run_dir, stage).join("checkpoint")
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
        let (all, _) = data::load(&cfg.data, &opts)?;
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

/// Variables of `vm` whose names start with one of `prefixes`, sorted by name.
fn vars_with_prefix(vm: &VarMap, prefixes: &[&str]) -> Result<Vec<(String, Var)>> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Msg("poisoned var map".into()))?;
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Loads tensors from a safetensors file into the variables of `vm` whose names start with one
/// of `prefixes`; every such variable must be present with the right shape.
fn load_vars(vm: &VarMap, path: &Path, prefixes: &[&str]) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let vars = vars_with_prefix(vm, prefixes)?;
    let dev = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let tensors = candle_core::safetensors::load_buffer(&bytes, &dev)
        .map_err(|e| Error::model(path, format!("not a valid safetensors file: {e}")))?;
    for (name, var) in vars {
        let t = tensors
            .get(&name)
            .ok_or_else(|| Error::model(path, format!("missing tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(Error::model(
                path,
                format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(t)?;
    }
    Ok(())
}

fn normalised_batch(
    data: &Dataset,
    idx: std::ops::Range<usize>,
    cfg: &ModelConfig,
    dev: &Device,
) -> Result<Tensor> {
    let (mean, std) = (cfg.input.mean, cfg.input.std);
    let px = &data.pixels[idx.start * FACE_PIXELS..idx.end * FACE_PIXELS];
    let v: Vec<f32> = px
        .iter()
        .map(|&p| (p as f32 / 255.0 - mean) / std)
        .collect();
    Ok(Tensor::from_vec(v, (idx.len(), 1, 48, 48), dev)?)
}

/// Encoder features and f_φ probabilities of every image (eval mode, no augmentation).
fn features_and_fphi(
    model: &FerModel,
    data: &Dataset,
    cfg: &ModelConfig,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut feats = Vec::new();
    let mut probs = Vec::new();
    let bs = 128;
    for start in (0..data.len()).step_by(bs) {
        let xs = normalised_batch(data, start..(start + bs).min(data.len()), cfg, dev)?;
        // Detached: the weights are training variables, and an attached result would keep the
        // whole forward graph (every activation of every batch) alive.
        let f = model.features(&xs, false)?.detach();
        probs.push(candle_nn::ops::softmax(&model.head_logits(&f)?, D::Minus1)?.detach());
        feats.push(f);
    }
    Ok((Tensor::cat(&feats, 0)?, Tensor::cat(&probs, 0)?))
}

/// f_φ accuracy on a dataset.
fn fphi_accuracy(model: &FerModel, data: &Dataset, cfg: &ModelConfig, dev: &Device) -> Result<f64> {
    let (_, probs) = features_and_fphi(model, data, cfg, dev)?;
    let pred: Vec<usize> = probs
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|p| p as usize)
        .collect();
    let labels: Vec<usize> = data.labels.iter().map(|&l| l as usize).collect();
    Ok(metrics::accuracy(&pred, &labels))
}

/// Cross-entropy with label smoothing `eps` (targets `eps/C + (1−eps)·onehot`).
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &[u32], eps: f64) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    let mut t = vec![(eps / c as f64) as f32; b * c];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) < c {
            t[i * c + l as usize] += (1.0 - eps) as f32;
        }
    }
    let targets = Tensor::from_vec(t, (b, c), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((targets * logp)?.sum(D::Minus1)?.mean_all()?.neg()?)
}

/// The state of a stage being trained: its variables, optimizer, bookkeeping.
struct StageRun<'a> {
    cfg: &'a TrainConfig,
    stage: Stage,
    /// Variables that are saved in checkpoints (all of the model, plus the projector for SSL).
    saved: Vec<(&'static str, &'a VarMap)>,
    opt: AdamW,
    epochs_done: usize,
    best_val: Option<f64>,
    best_epoch: Option<usize>,
}

impl<'a> StageRun<'a> {
    fn new(
        cfg: &'a TrainConfig,
        stage: Stage,
        saved: Vec<(&'static str, &'a VarMap)>,
        trainable: Vec<(String, Var)>,
        weight_decay: f64,
        resume: bool,
    ) -> Result<Self> {
        let mut run = Self {
            cfg,
            stage,
            saved,
            opt: AdamW::new(trainable, weight_decay)?,
            epochs_done: 0,
            best_val: None,
            best_epoch: None,
        };
        let ck = checkpoint_dir(&cfg.run_dir, stage);
        let state_path = ck.join("state.json");
        if state_path.exists() {
            if !resume {
                return Err(Error::Config(format!(
                    "{} holds a checkpoint of stage {}: pass --resume to continue it, or use a new --run-dir",
                    ck.display(),
                    stage.name()
                )));
            }
            run.restore(&ck)?;
        }
        Ok(run)
    }

    fn restore(&mut self, ck: &Path) -> Result<()> {
        let state_path = ck.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .map_err(|e| Error::model(&state_path, format!("corrupt checkpoint state: {e}")))?;
        if state.config.model != self.cfg.model || state.config.seed != self.cfg.seed {
            return Err(Error::Config(format!(
                "{}: the checkpoint was made with a different model config or seed; resume with the same settings",
                state_path.display()
            )));
        }
        for (name, vm) in &self.saved {
            load_vars(vm, &ck.join(format!("{name}.safetensors")), &[""])?;
        }
        self.opt
            .load(&ck.join("optimizer.safetensors"), state.optimizer_steps)?;
        self.epochs_done = state.epochs_done;
        self.best_val = state.best_val;
        self.best_epoch = state.best_epoch;
        Ok(())
    }

    /// Writes the checkpoint for the epochs done so far (atomically).
    fn checkpoint(&self) -> Result<()> {
        let ck = checkpoint_dir(&self.cfg.run_dir, self.stage);
        write_dir_atomically(&ck, |tmp| {
            for (name, vm) in &self.saved {
                let p = tmp.join(format!("{name}.safetensors"));
                vm.save(&p).map_err(|e| Error::model(&p, e.to_string()))?;
            }
            self.opt.save(&tmp.join("optimizer.safetensors"))?;
            let state = CheckpointState {
                stage: self.stage.name().into(),
                epochs_done: self.epochs_done,
                optimizer_steps: self.opt.steps(),
                best_val: self.best_val,
                best_epoch: self.best_epoch,
                config: self.cfg.clone(),
            };
            let json =
                serde_json::to_string_pretty(&state).map_err(|e| Error::Msg(e.to_string()))?;
            write_file_atomically(&tmp.join("state.json"), json.as_bytes())
        })
    }

    fn save_model(&self, vm: &VarMap) -> Result<PathBuf> {
        let dir = model_dir(&self.cfg.run_dir, self.stage);
        write_dir_atomically(&dir, |tmp| write_model_files(tmp, &self.cfg.model, vm))?;
        Ok(dir)
    }

    fn check_finite(&self, loss: f64, epoch: usize, step: usize) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        let ck = checkpoint_dir(&self.cfg.run_dir, self.stage);
        let last = if self.epochs_done > 0 {
            format!(
                "the last good checkpoint ({} epochs) is {}",
                self.epochs_done,
                ck.display()
            )
        } else {
            "no checkpoint was written yet".to_string()
        };
        Err(Error::Msg(format!(
            "stage {}: loss became {loss} at epoch {} step {}; stopped ({last}). Lower the learning rate.",
            self.stage.name(),
            epoch + 1,
            step + 1
        )))
    }
}

/// Timing of an epoch loop.
#[derive(Default)]
struct Throughput {
    images: usize,
    seconds: f64,
    waiting: f64,
}

/// Runs `epochs` of a batch loop over loader batches; `step(batch, lr) -> loss`.
#[allow(clippy::too_many_arguments)]
fn run_epochs(
    run: &mut StageRun,
    plan_for: &dyn Fn(usize) -> EpochPlan,
    epochs: usize,
    base_lr: f64,
    warmup_epochs: f64,
    progress: &mut dyn FnMut(&Progress),
    step: &mut dyn FnMut(&loader::Batch) -> Result<Tensor>,
    after_epoch: &mut dyn FnMut(&mut StageRun, usize) -> Result<Option<f64>>,
    tput: &mut Throughput,
) -> Result<()> {
    let steps_per_epoch = plan_for(0).batches();
    let total = epochs * steps_per_epoch;
    let warmup = (warmup_epochs * steps_per_epoch as f64).round() as usize;
    while run.epochs_done < epochs {
        let epoch = run.epochs_done;
        let start = Instant::now();
        let (rx, handle) = plan_for(epoch)
            .spawn(3)
            .map_err(|e| Error::Msg(format!("cannot start the data loader: {e}")))?;
        let mut loss_sum = 0.0;
        let mut images = 0;
        let mut waiting = 0.0;
        for i in 0..steps_per_epoch {
            let t_wait = Instant::now();
            let Ok(batch) = rx.recv() else {
                return Err(Error::Msg("the data loader stopped early".into()));
            };
            waiting += t_wait.elapsed().as_secs_f64();
            let lr = warmup_cosine(run.opt.steps(), total, warmup, base_lr, 0.01);
            let loss_t = step(&batch)?;
            let loss = loss_t.to_scalar::<f32>()? as f64;
            run.check_finite(loss, epoch, i)?;
            let grads = loss_t.backward()?;
            run.opt.step(&grads, lr)?;
            loss_sum += loss;
            images += batch.len();
            progress(&Progress {
                stage: run.stage,
                epoch,
                epochs,
                step: i + 1,
                steps: steps_per_epoch,
                loss,
                images_per_s: images as f64 / start.elapsed().as_secs_f64().max(1e-9),
            });
        }
        drop(rx);
        let _ = handle.join();
        let seconds = start.elapsed().as_secs_f64();
        tput.images += images;
        tput.seconds += seconds;
        tput.waiting += waiting;
        run.epochs_done += 1;
        let val = after_epoch(run, epoch)?;
        if let Some(v) = val {
            if run.best_val.is_none_or(|b| v > b) {
                run.best_val = Some(v);
                run.best_epoch = Some(epoch + 1);
            }
        }
        run.checkpoint()?;
        log_metrics(
            &run.cfg.run_dir,
            serde_json::json!({
                "stage": run.stage.name(),
                "epoch": epoch + 1,
                "steps": run.opt.steps(),
                "loss": loss_sum / steps_per_epoch.max(1) as f64,
                "lr": warmup_cosine(run.opt.steps().saturating_sub(1), total, warmup, base_lr, 0.01),
                "images_per_s": images as f64 / seconds.max(1e-9),
                "data_wait_share": waiting / seconds.max(1e-9),
                "val_accuracy": val,
                "seconds": seconds,
            }),
        )?;
        plots::plot_stage(&run.cfg.run_dir, run.stage.name())?;
    }
    Ok(())
}

/// The loader plan of one epoch: order and augmentation seeded by (seed, stage, epoch).
fn epoch_plan(
    cfg: &TrainConfig,
    stage: Stage,
    data: &Arc<Dataset>,
    opt: &StageConfig,
    views: usize,
    epoch: usize,
) -> EpochPlan {
    EpochPlan {
        data: data.clone(),
        batch_size: opt.batch_size,
        augment: opt.augment.clone(),
        views,
        seed: mix_seed(&[cfg.seed, stage.id(), epoch as u64]),
        mean: cfg.model.input.mean,
        std: cfg.model.input.std,
    }
}

fn new_model(cfg: &TrainConfig, dev: &Device, seed: u64) -> Result<(VarMap, FerModel)> {
    let vm = VarMap::new();
    let model = FerModel::new(&cfg.model, VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    seeded_init(&vm, seed)?;
    Ok((vm, model))
}

fn batch_tensor(view: &[f32], n: usize, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(view.to_vec(), (n, 1, 48, 48), dev)?)
}

fn summary(run: &StageRun, tput: &Throughput, dir: PathBuf) -> StageSummary {
    StageSummary {
        stage: run.stage.name(),
        epochs_run: run.epochs_done,
        images_per_s: tput.images as f64 / tput.seconds.max(1e-9),
        data_wait_share: tput.waiting / tput.seconds.max(1e-9),
        best_val_accuracy: run.best_val,
        best_epoch: run.best_epoch,
        model_dir: dir,
    }
}

/// Stage 1: Barlow Twins on unlabeled faces (Training pixels, labels ignored, plus extras).
pub fn train_ssl(
    cfg: &TrainConfig,
    data: &TrainData,
    dev: &Device,
    resume: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<StageSummary> {
    let (vm, model) = new_model(cfg, dev, mix_seed(&[cfg.seed, Stage::Ssl.id()]))?;
    let vm_proj = VarMap::new();
    let projector = Projector::new(
        model.encoder.out_dim(),
        &cfg.ssl.projector,
        VarBuilder::from_varmap(&vm_proj, DType::F32, dev),
    )?;
    seeded_init(&vm_proj, mix_seed(&[cfg.seed, Stage::Ssl.id(), 1]))?;
    let mut trainable = vars_with_prefix(&vm, &["encoder."])?;
    trainable.extend(vars_with_prefix(&vm_proj, &[""])?);
    let o = &cfg.ssl.opt;
    let mut run = StageRun::new(
        cfg,
        Stage::Ssl,
        vec![("model", &vm), ("projector", &vm_proj)],
        trainable,
        o.weight_decay,
        resume,
    )?;
    let plan_for = |epoch| epoch_plan(cfg, Stage::Ssl, &data.unlabeled, o, 2, epoch);
    let mut step = |b: &loader::Batch| -> Result<Tensor> {
        let n = b.len();
        let za = projector.forward_t(
            &model.features(&batch_tensor(&b.views[0], n, dev)?, true)?,
            true,
        )?;
        let zb = projector.forward_t(
            &model.features(&batch_tensor(&b.views[1], n, dev)?, true)?,
            true,
        )?;
        Ok(barlow_twins_loss(&za, &zb, cfg.ssl.lambda)?)
    };
    let mut after = |run: &mut StageRun, _epoch: usize| -> Result<Option<f64>> {
        run.save_model(&vm)?;
        Ok(None)
    };
    let mut tput = Throughput::default();
    run_epochs(
        &mut run,
        &plan_for,
        o.epochs,
        o.lr,
        o.warmup_epochs,
        progress,
        &mut step,
        &mut after,
        &mut tput,
    )?;
    let dir = run.save_model(&vm)?;
    Ok(summary(&run, &tput, dir))
}

/// Stage 2: f_φ (encoder + linear head) with cross-entropy, from `init` (an SSL model directory)
/// or from scratch. Keeps the epoch with the best PublicTest accuracy.
pub fn train_classifier(
    cfg: &TrainConfig,
    data: &TrainData,
    init: Option<&Path>,
    dev: &Device,
    resume: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<StageSummary> {
    let (vm, model) = new_model(cfg, dev, mix_seed(&[cfg.seed, Stage::Classifier.id()]))?;
    if let Some(dir) = init {
        crate::model::read_config(dir).and_then(|c| {
            if c.encoder == cfg.model.encoder {
                Ok(())
            } else {
                Err(Error::model(
                    dir,
                    "its encoder differs from the training config's",
                ))
            }
        })?;
        load_vars(&vm, &dir.join(crate::model::WEIGHTS_FILE), &["encoder."])?;
    }
    let trainable = vars_with_prefix(&vm, &["encoder.", "head."])?;
    let o = &cfg.classifier.opt;
    let mut run = StageRun::new(
        cfg,
        Stage::Classifier,
        vec![("model", &vm)],
        trainable,
        o.weight_decay,
        resume,
    )?;
    let plan_for = |epoch| epoch_plan(cfg, Stage::Classifier, &data.train, o, 1, epoch);
    let mut step = |b: &loader::Batch| -> Result<Tensor> {
        let xs = batch_tensor(&b.views[0], b.len(), dev)?;
        let logits = model.head_logits(&model.features(&xs, true)?)?;
        smoothed_cross_entropy(&logits, &b.labels, cfg.classifier.label_smoothing)
    };
    let mut after = |run: &mut StageRun, _epoch: usize| -> Result<Option<f64>> {
        let acc = fphi_accuracy(&model, &data.val, &cfg.model, dev)?;
        if run.best_val.is_none_or(|b| acc > b) {
            run.save_model(&vm)?;
        }
        Ok(Some(acc))
    };
    let mut tput = Throughput::default();
    run_epochs(
        &mut run,
        &plan_for,
        o.epochs,
        o.lr,
        o.warmup_epochs,
        progress,
        &mut step,
        &mut after,
        &mut tput,
    )?;
    let dir = model_dir(&cfg.run_dir, Stage::Classifier);
    if !dir.exists() {
        run.save_model(&vm)?;
    }
    Ok(summary(&run, &tput, dir))
}

/// Stage 3: CARD's ε_θ with the encoder and f_φ of `init` frozen. Features are computed once, so
/// the stage costs one encoder pass over the data plus small MLP steps.
pub fn train_card(
    cfg: &TrainConfig,
    data: &TrainData,
    init: &Path,
    dev: &Device,
    resume: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<StageSummary> {
    let (vm, model) = new_model(cfg, dev, mix_seed(&[cfg.seed, Stage::Card.id()]))?;
    let init_cfg = crate::model::read_config(init)?;
    if init_cfg.encoder != cfg.model.encoder || init_cfg.classes != cfg.model.classes {
        return Err(Error::model(
            init,
            "its encoder or classes differ from the training config's",
        ));
    }
    load_vars(
        &vm,
        &init.join(crate::model::WEIGHTS_FILE),
        &["encoder.", "head."],
    )?;
    let trainable = vars_with_prefix(&vm, &["card."])?;
    let c = &cfg.card;
    let mut run = StageRun::new(
        cfg,
        Stage::Card,
        vec![("model", &vm)],
        trainable,
        c.weight_decay,
        resume,
    )?;
    let t0 = Instant::now();
    let (train_feats, train_f) = features_and_fphi(&model, &data.train, &cfg.model, dev)?;
    let (val_feats, val_f) = features_and_fphi(&model, &data.val, &cfg.model, dev)?;
    let feature_seconds = t0.elapsed().as_secs_f64();
    let schedule = model.schedule().clone();
    let n = data.train.len();
    let steps_per_epoch = n / c.batch_size + usize::from(n % c.batch_size >= 2);
    let total = c.epochs * steps_per_epoch;
    let mut tput = Throughput::default();
    while run.epochs_done < c.epochs {
        let epoch = run.epochs_done;
        let start = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix_seed(&[
            cfg.seed,
            Stage::Card.id(),
            epoch as u64,
        ]));
        let mut order: Vec<u32> = (0..n as u32).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        let mut loss_sum = 0.0;
        for s in 0..steps_per_epoch {
            let idx = &order[s * c.batch_size..((s + 1) * c.batch_size).min(n)];
            let b = idx.len();
            let ids = Tensor::from_slice(idx, b, dev)?;
            let feats = train_feats.index_select(&ids, 0)?;
            let f = train_f.index_select(&ids, 0)?;
            let labels: Vec<u32> = idx
                .iter()
                .map(|&i| data.train.labels[i as usize] as u32)
                .collect();
            let batch = CardBatch::draw(&labels, &f, &schedule, &mut rng, dev)?;
            let eps_hat = model.card.forward(&feats, &batch.y_t, &f, &batch.t, true)?;
            let loss_t = batch.loss(&eps_hat)?;
            let loss = loss_t.to_scalar::<f32>()? as f64;
            run.check_finite(loss, epoch, s)?;
            let lr = warmup_cosine(run.opt.steps(), total, 0, c.lr, 0.01);
            run.opt.step(&loss_t.backward()?, lr)?;
            loss_sum += loss;
            progress(&Progress {
                stage: Stage::Card,
                epoch,
                epochs: c.epochs,
                step: s + 1,
                steps: steps_per_epoch,
                loss,
                images_per_s: ((s + 1) * c.batch_size) as f64
                    / start.elapsed().as_secs_f64().max(1e-9),
            });
        }
        run.epochs_done += 1;
        // PublicTest accuracy of the CARD majority vote, sampled 256 images at a time.
        let mut pred: Vec<usize> = Vec::with_capacity(data.val.len());
        for lo in (0..data.val.len()).step_by(256) {
            let len = 256.min(data.val.len() - lo);
            let mut rngs: Vec<_> = (lo..lo + len)
                .map(|i| crate::rngs::keyed_rng(&[cfg.seed, 99, epoch as u64, i as u64]))
                .collect();
            let y = model.sample(
                &val_feats.narrow(0, lo, len)?,
                &val_f.narrow(0, lo, len)?,
                c.val_samples,
                cfg.model.card.steps,
                &mut rngs,
            )?;
            let probs = sample_probs(&y, cfg.model.card.temperature)?;
            let (nv, s_, cc) = probs.dims3()?;
            let flat = probs.flatten_all()?.to_vec1::<f32>()?;
            pred.extend((0..nv).map(|i| {
                let rows = &flat[i * s_ * cc..(i + 1) * s_ * cc];
                metrics::summarize_samples(rows, cc, cfg.model.card.alpha).label
            }));
        }
        let labels: Vec<usize> = data.val.labels.iter().map(|&l| l as usize).collect();
        let acc = metrics::accuracy(&pred, &labels);
        if run.best_val.is_none_or(|b| acc > b) {
            run.best_val = Some(acc);
            run.best_epoch = Some(epoch + 1);
            run.save_model(&vm)?;
        }
        run.checkpoint()?;
        let seconds = start.elapsed().as_secs_f64();
        tput.images += steps_per_epoch * c.batch_size;
        tput.seconds += seconds;
        log_metrics(
            &cfg.run_dir,
            serde_json::json!({
                "stage": "card",
                "epoch": epoch + 1,
                "steps": run.opt.steps(),
                "loss": loss_sum / steps_per_epoch.max(1) as f64,
                "val_accuracy": acc,
                "seconds": seconds,
                "feature_seconds": feature_seconds,
            }),
        )?;
        plots::plot_stage(&cfg.run_dir, Stage::Card.name())?;
    }
    let dir = model_dir(&cfg.run_dir, Stage::Card);
    if !dir.exists() {
        run.save_model(&vm)?;
    }
    Ok(summary(&run, &tput, dir))
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
        let has = ck.join("state.json").exists() || model_dir(run_dir, stage).exists();
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
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<StageSummary>> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.run_dir).map_err(|e| Error::io(&cfg.run_dir, e))?;
    let _lock = lock_run_dir(&cfg.run_dir)?;
    check_run_dir(&cfg.run_dir, selection, resume)?;
    let json = serde_json::to_string_pretty(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    write_file_atomically(&cfg.run_dir.join("config.json"), json.as_bytes())?;
    let data = TrainData::load(cfg)?;
    let mut out = Vec::new();
    let ssl_model = model_dir(&cfg.run_dir, Stage::Ssl);
    let cls_model = model_dir(&cfg.run_dir, Stage::Classifier);
    if selection == StageSelection::Ssl || (selection == StageSelection::All && !from_scratch) {
        out.push(train_ssl(cfg, &data, dev, resume, progress)?);
    }
    if matches!(selection, StageSelection::Classifier | StageSelection::All) {
        let start = if from_scratch {
            None
        } else if let Some(i) = init.filter(|_| selection == StageSelection::Classifier) {
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
            progress,
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
        out.push(train_card(cfg, &data, &start, dev, resume, progress)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features cached for the CARD stage must not hold the forward graph (it kept every
    /// activation of the training set alive: 24 GB on FER2013).
    #[test]
    fn cached_features_are_detached() {
        let mut cfg = TrainConfig::new("x".into(), "y".into());
        cfg.model.encoder.stem = crate::config::Stem::Conv7x7Pool;
        cfg.model.encoder.widths = [8, 8, 16, 16];
        cfg.model.encoder.blocks = [1, 1, 1, 1];
        cfg.model.encoder.cbam_reduction = 4;
        let dev = Device::Cpu;
        let (_vm, model) = new_model(&cfg, &dev, 1).unwrap();
        let data = Dataset {
            class_names: cfg.model.classes.clone(),
            split_names: vec!["Training".into()],
            pixels: vec![100; 3 * FACE_PIXELS],
            labels: vec![0, 1, 2],
            splits: vec![0; 3],
        };
        let (f, p) = features_and_fphi(&model, &data, &cfg.model, &dev).unwrap();
        assert_eq!(f.dims(), &[3, 16]);
        assert_eq!(p.dims(), &[3, 7]);
        assert!(!f.track_op() && !p.track_op());
    }
}
