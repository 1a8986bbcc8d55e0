//! A stage's variables, optimizer and bookkeeping ([`StageRun`]), and its checkpoint: written
//! atomically after every epoch, restored by `--resume` only with the same model config and seed.

use std::path::{Path, PathBuf};

use candle_core::{Device, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::{Stage, TrainConfig};
use crate::error::{Error, Result};
use crate::fsutil::{write_dir_atomically, write_file_atomically};
use crate::model::write_model_files;

/// Checkpoint state saved as `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointState {
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

pub(super) fn checkpoint_dir(run_dir: &Path, stage: Stage) -> PathBuf {
    stage_dir(run_dir, stage).join("checkpoint")
}

/// Variables of `vm` whose names start with one of `prefixes`, sorted by name.
pub(super) fn vars_with_prefix(vm: &VarMap, prefixes: &[&str]) -> Result<Vec<(String, Var)>> {
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
pub(super) fn load_vars(vm: &VarMap, path: &Path, prefixes: &[&str]) -> Result<()> {
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
        // A no-op for a tensor already in the variable's dtype.
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The state of a stage being trained: its variables, optimizer, bookkeeping.
pub(super) struct StageRun<'a> {
    pub cfg: &'a TrainConfig,
    pub stage: Stage,
    /// Variables that are saved in checkpoints (all of the model, plus the projector for SSL).
    saved: Vec<(&'static str, &'a VarMap)>,
    pub opt: AdamW,
    pub epochs_done: usize,
    pub best_val: Option<f64>,
    pub best_epoch: Option<usize>,
}

impl<'a> StageRun<'a> {
    pub fn new(
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
    pub fn checkpoint(&self) -> Result<()> {
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

    /// Writes the stage's model directory from its `model` variables.
    pub fn save_model(&self) -> Result<PathBuf> {
        let Some((_, vm)) = self.saved.iter().find(|(name, _)| *name == "model") else {
            return Err(Error::Msg(format!(
                "stage {}: no model variables",
                self.stage.name()
            )));
        };
        let dir = model_dir(&self.cfg.run_dir, self.stage);
        write_dir_atomically(&dir, |tmp| write_model_files(tmp, &self.cfg.model, vm))?;
        Ok(dir)
    }

    /// The stage's model directory, written now if no epoch wrote one.
    pub fn model_dir_or_save(&self) -> Result<PathBuf> {
        let dir = model_dir(&self.cfg.run_dir, self.stage);
        if dir.exists() {
            Ok(dir)
        } else {
            self.save_model()
        }
    }

    pub fn check_finite(&self, loss: f64, epoch: usize, step: usize) -> Result<()> {
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
