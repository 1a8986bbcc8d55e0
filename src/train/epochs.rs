//! The one epoch loop every stage runs, and the batch sources that feed it: the augmenting data
//! loader (SSL and f_φ) and shuffled rows of precomputed features (the CARD head).

use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{Device, Tensor};
use crossbeam_channel::Receiver;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::card_batch::CardBatch;
use super::checkpoint::checkpoint_dir;
use super::checkpoint::StageRun;
use super::loader::{self, EpochPlan};
use super::optim::warmup_cosine;
use super::{log_metrics, mix_seed, plots, CardY0, Monitor, Progress, Stage};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::kernels::precision::{self, Precision};
use crate::model::diffusion::Schedule;

/// Where a stage's batches come from, one epoch at a time. The batches of an epoch depend only
/// on (seed, stage, epoch), so a resumed run sees the same batches as an uninterrupted one.
pub(super) trait BatchSource {
    type Batch;
    fn steps_per_epoch(&self) -> usize;
    /// Begins epoch `epoch` (0-based).
    fn start(&mut self, epoch: usize) -> Result<()>;
    /// The next batch of the epoch begun last.
    fn next_batch(&mut self) -> Result<Self::Batch>;
    /// Ends the epoch (a loader thread is stopped and joined).
    fn finish(&mut self) {}
    /// Images in a batch.
    fn images(batch: &Self::Batch) -> usize;
}

/// Augmented image batches from the background data loader.
pub(super) struct LoaderSource<F: Fn(usize) -> EpochPlan> {
    plan_for: F,
    running: Option<(Receiver<loader::Batch>, JoinHandle<()>)>,
}

impl<F: Fn(usize) -> EpochPlan> LoaderSource<F> {
    /// `plan_for(epoch)`: the loader plan of each epoch.
    pub fn new(plan_for: F) -> Self {
        Self {
            plan_for,
            running: None,
        }
    }
}

impl<F: Fn(usize) -> EpochPlan> BatchSource for LoaderSource<F> {
    type Batch = loader::Batch;

    fn steps_per_epoch(&self) -> usize {
        (self.plan_for)(0).batches()
    }

    fn start(&mut self, epoch: usize) -> Result<()> {
        self.finish();
        let running = (self.plan_for)(epoch)
            .spawn(3)
            .map_err(|e| Error::Msg(format!("cannot start the data loader: {e}")))?;
        self.running = Some(running);
        Ok(())
    }

    fn next_batch(&mut self) -> Result<loader::Batch> {
        self.running
            .as_ref()
            .and_then(|(rx, _)| rx.recv().ok())
            .ok_or_else(|| Error::Msg("the data loader stopped early".into()))
    }

    fn finish(&mut self) {
        if let Some((rx, handle)) = self.running.take() {
            drop(rx);
            let _ = handle.join();
        }
    }

    fn images(batch: &loader::Batch) -> usize {
        batch.len()
    }
}

/// A CARD training batch: rows of the frozen features and f_φ's probabilities, and the noised
/// labels drawn for them.
pub(super) struct CardRows {
    pub feats: Tensor,
    pub f: Tensor,
    pub batch: CardBatch,
}

/// CARD batches: the Training rows of precomputed features in a shuffled order, with fresh
/// timesteps and noise. One generator per epoch, seeded by (seed, stage, epoch), shuffles the
/// rows and then draws every batch's noise in turn.
pub(super) struct CardSource<'a> {
    feats: &'a Tensor,
    f: &'a Tensor,
    data: &'a Dataset,
    y0: Y0Rows,
    schedule: &'a Schedule,
    batch_size: usize,
    /// [`super::CardTrainConfig::feature_dropout`].
    feature_dropout: f64,
    seed: u64,
    dev: &'a Device,
    epoch: Option<(StdRng, Vec<u32>, usize)>,
}

/// How a row's CARD label vector y_0 is made.
#[derive(Debug, Clone, Copy)]
pub(super) struct Y0Rows {
    pub kind: CardY0,
    /// The single label's share of a vote target.
    pub single_weight: f64,
}

impl Y0Rows {
    fn row(&self, data: &Dataset, r: usize) -> Vec<f32> {
        match self.kind {
            CardY0::OneHot => super::targets::smoothed_targets(
                &[data.labels[r] as u32],
                data.class_names.len(),
                0.0,
            ),
            CardY0::Votes => super::targets::vote_target(data, r, self.single_weight),
        }
    }
}

impl<'a> CardSource<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        feats: &'a Tensor,
        f: &'a Tensor,
        data: &'a Dataset,
        y0: Y0Rows,
        schedule: &'a Schedule,
        batch_size: usize,
        feature_dropout: f64,
        seed: u64,
        dev: &'a Device,
    ) -> Self {
        Self {
            feats,
            f,
            data,
            y0,
            schedule,
            batch_size,
            feature_dropout,
            seed,
            dev,
            epoch: None,
        }
    }
}

impl BatchSource for CardSource<'_> {
    type Batch = CardRows;

    fn steps_per_epoch(&self) -> usize {
        let (n, bs) = (self.data.len(), self.batch_size);
        n / bs + usize::from(n % bs >= 2)
    }

    fn start(&mut self, epoch: usize) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(mix_seed(&[self.seed, Stage::Card.id(), epoch as u64]));
        let mut order: Vec<u32> = (0..self.data.len() as u32).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        self.epoch = Some((rng, order, 0));
        Ok(())
    }

    fn next_batch(&mut self) -> Result<CardRows> {
        let Some((rng, order, step)) = self.epoch.as_mut() else {
            return Err(Error::Msg("CARD batches: no epoch begun".into()));
        };
        let bs = self.batch_size;
        let idx = &order[*step * bs..((*step + 1) * bs).min(order.len())];
        *step += 1;
        let ids = Tensor::from_slice(idx, idx.len(), self.dev)?;
        let feats = self.feats.index_select(&ids, 0)?;
        let f = self.f.index_select(&ids, 0)?;
        let y0: Vec<f32> = idx
            .iter()
            .flat_map(|&i| self.y0.row(self.data, i as usize))
            .collect();
        let batch = CardBatch::draw(y0, &f, self.schedule, rng, self.dev)?;
        let p = self.feature_dropout;
        let feats = if p > 0.0 {
            // Drawn after the batch's noise, so a run without dropout draws what it always did.
            let keep = (1.0 / (1.0 - p)) as f32;
            let mask: Vec<f32> = (0..feats.elem_count())
                .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
                .collect();
            let mask = Tensor::from_vec(mask, feats.dims(), self.dev)?;
            (feats * mask)?
        } else {
            feats
        };
        Ok(CardRows { feats, f, batch })
    }

    fn images(batch: &CardRows) -> usize {
        batch.batch.y0.dims()[0]
    }
}

/// Timing of an epoch loop.
#[derive(Default)]
pub(super) struct Throughput {
    pub images: usize,
    pub seconds: f64,
    pub waiting: f64,
}

/// The learning-rate schedule of a stage: warm-up, then cosine to 1% of `base_lr`.
pub(super) struct LrSchedule {
    pub epochs: usize,
    pub base_lr: f64,
    pub warmup_epochs: f64,
}

impl LrSchedule {
    pub fn of(o: &super::StageConfig) -> Self {
        Self {
            epochs: o.epochs,
            base_lr: o.lr,
            warmup_epochs: o.warmup_epochs,
        }
    }
}

/// What a stage measures after an epoch.
pub(super) enum EpochScore {
    /// A validation score (`val_accuracy`); the best epoch's model is kept.
    Select(f64),
    /// A validation score (`val_accuracy`) that chooses nothing: every epoch's model is kept,
    /// so the stage ends with its last (and reports that epoch's score as the kept model's).
    Last(f64),
    /// A score that is only reported, as the metrics line's `key` and the note's `label`
    /// (`None`: not measured); every epoch's model is kept.
    Watch {
        key: &'static str,
        label: &'static str,
        value: Option<f64>,
    },
}

/// Runs the stage's remaining epochs: per batch `step(batch) → loss`, backward and an AdamW
/// step; after each epoch `score(epoch)` ([`EpochScore`]); then a checkpoint, a metrics line
/// (with `extra` fields) and the stage's plots.
pub(super) fn run_epochs<S: BatchSource>(
    run: &mut StageRun,
    source: &mut S,
    lr: &LrSchedule,
    monitor: &mut Monitor,
    step: &mut dyn FnMut(&S::Batch) -> Result<Tensor>,
    score: &mut dyn FnMut(usize) -> Result<EpochScore>,
    extra: serde_json::Value,
) -> Result<Throughput> {
    let mut tput = Throughput::default();
    let steps_per_epoch = source.steps_per_epoch();
    let total = lr.epochs * steps_per_epoch;
    let warmup = (lr.warmup_epochs * steps_per_epoch as f64).round() as usize;
    let rate = |step: usize| warmup_cosine(step, total, warmup, lr.base_lr, 0.01);
    let precision = run.cfg.precision;
    if run.epochs_done < lr.epochs {
        (monitor.note)(&format!(
            "{}: epochs {}..={} of {}, {steps_per_epoch} steps each",
            run.stage.name(),
            run.epochs_done + 1,
            lr.epochs,
            lr.epochs
        ));
        if precision != Precision::F32 {
            (monitor.note)(&match precision.available() {
                true => format!(
                    "{}: the convolutions' Winograd F(2x2) GEMMs in {} (f32 sums)",
                    run.stage.name(),
                    precision.name()
                ),
                false => format!(
                    "{}: precision {} asked, but this CPU has no AVX512-BF16: f32",
                    run.stage.name(),
                    precision.name()
                ),
            });
        }
    }
    while run.epochs_done < lr.epochs {
        let epoch = run.epochs_done;
        let start = Instant::now();
        source.start(epoch)?;
        let mut loss_sum = 0.0;
        let mut images = 0;
        let mut waiting = 0.0;
        for i in 0..steps_per_epoch {
            if monitor.stopped() {
                source.finish();
                return Err(interrupted(run, epoch, i));
            }
            let t_wait = Instant::now();
            let batch = source.next_batch()?;
            waiting += t_wait.elapsed().as_secs_f64();
            let lr_now = rate(run.opt.steps());
            // The step's precision, for its forward and backward passes only (validation and
            // checkpoints run outside it, in f32).
            let in_precision = precision::scope(precision);
            let loss_t = step(&batch)?;
            let loss = loss_t.to_scalar::<f32>()? as f64;
            run.check_finite(loss, epoch, i)?;
            let grads = loss_t.backward()?;
            drop(in_precision);
            run.opt.step(&grads, lr_now)?;
            loss_sum += loss;
            images += S::images(&batch);
            (monitor.progress)(&Progress {
                stage: run.stage,
                epoch,
                epochs: lr.epochs,
                step: i + 1,
                steps: steps_per_epoch,
                loss,
                images_per_s: images as f64 / start.elapsed().as_secs_f64().max(1e-9),
            });
        }
        source.finish();
        let seconds = start.elapsed().as_secs_f64();
        run.epochs_done += 1;
        let scored = score(epoch)?;
        let val = match scored {
            EpochScore::Select(v) | EpochScore::Last(v) => Some(v),
            EpochScore::Watch { .. } => None,
        };
        let keep = match scored {
            EpochScore::Select(v) => run.best_val.is_none_or(|b| v > b),
            EpochScore::Last(_) | EpochScore::Watch { .. } => true,
        };
        if keep {
            if val.is_some() {
                run.best_val = val;
                run.best_epoch = Some(epoch + 1);
            }
            run.save_model()?;
        }
        run.checkpoint()?;
        tput.images += images;
        tput.seconds += seconds;
        tput.waiting += waiting;
        let mut line = serde_json::json!({
            "stage": run.stage.name(),
            "epoch": epoch + 1,
            "steps": run.opt.steps(),
            "loss": loss_sum / steps_per_epoch.max(1) as f64,
            "lr": rate(run.opt.steps().saturating_sub(1)),
            "images_per_s": images as f64 / seconds.max(1e-9),
            "data_wait_share": waiting / seconds.max(1e-9),
            "val_accuracy": val,
            "seconds": seconds,
        });
        if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), &extra) {
            line.extend(extra.clone());
        }
        if let (Some(line), EpochScore::Watch { key, value, .. }) = (line.as_object_mut(), &scored)
        {
            line.insert((*key).into(), serde_json::json!(value));
        }
        log_metrics(&run.cfg.run_dir, line)?;
        plots::plot_stage(&run.cfg.run_dir, run.stage.name())?;
        let scored = match (&scored, run.best_val, run.best_epoch) {
            (EpochScore::Select(v), Some(b), Some(e)) => format!(
                ", PublicTest {:.2}% (best {:.2}%, epoch {e})",
                100.0 * v,
                100.0 * b
            ),
            (EpochScore::Last(v), ..) => {
                format!(", PublicTest {:.2}% (the last epoch is kept)", 100.0 * v)
            }
            (
                EpochScore::Watch {
                    label,
                    value: Some(v),
                    ..
                },
                ..,
            ) => format!(", {label} {:.2}%", 100.0 * v),
            _ => String::new(),
        };
        (monitor.note)(&format!(
            "{} epoch {}/{}: loss {:.4}{scored}, {:.1} images/s, {}",
            run.stage.name(),
            epoch + 1,
            lr.epochs,
            loss_sum / steps_per_epoch.max(1) as f64,
            images as f64 / seconds.max(1e-9),
            humantime::format_duration(std::time::Duration::from_secs(seconds.round() as u64))
        ));
    }
    Ok(tput)
}

/// The error of a stage stopped by a signal before step `step` of epoch `epoch`.
fn interrupted(run: &StageRun, epoch: usize, step: usize) -> Error {
    let resume = if run.epochs_done > 0 {
        format!(
            "its checkpoint after {} epoch(s) is in {}: continue with --resume",
            run.epochs_done,
            checkpoint_dir(&run.cfg.run_dir, run.stage).display()
        )
    } else {
        "no epoch had finished, so there is no checkpoint yet".to_string()
    };
    Error::Msg(format!(
        "stage {} interrupted at epoch {} step {}; {resume}",
        run.stage.name(),
        epoch + 1,
        step + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::CardY0;

    fn first_batch(feats: &Tensor, f: &Tensor, data: &Dataset, p: f64) -> CardRows {
        let schedule = Schedule::linear(10, 0.01, 0.95);
        let y0 = Y0Rows {
            kind: CardY0::OneHot,
            single_weight: 0.0,
        };
        let mut source = CardSource::new(feats, f, data, y0, &schedule, 32, p, 7, &Device::Cpu);
        source.start(0).unwrap();
        source.next_batch().unwrap()
    }

    /// Feature dropout zeroes about its share of the features, scales the rest by 1/(1 − p), and
    /// leaves the batch's timesteps and noise as a run without it draws them.
    #[test]
    fn card_feature_dropout_masks_features_after_the_batch_draw() {
        let (n, dim, classes) = (32, 200, 7);
        let data = Dataset {
            class_names: (0..classes).map(|c| c.to_string()).collect(),
            split_names: vec!["Training".into()],
            pixels: vec![0; n * crate::data::FACE_PIXELS],
            labels: (0..n).map(|i| (i % classes) as u8).collect(),
            splits: vec![0; n],
            ..Default::default()
        };
        let dev = Device::Cpu;
        let feats = Tensor::ones((n, dim), candle_core::DType::F32, &dev).unwrap();
        let f = (Tensor::ones((n, classes), candle_core::DType::F32, &dev).unwrap()
            / classes as f64)
            .unwrap();
        let plain = first_batch(&feats, &f, &data, 0.0);
        assert_eq!(
            plain.feats.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; n * dim]
        );
        let dropped = first_batch(&feats, &f, &data, 0.75);
        let v = dropped
            .feats
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || x == 4.0));
        let zeros = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((0.72..0.78).contains(&zeros), "{zeros}");
        for (a, b) in [
            (&plain.batch.y_t, &dropped.batch.y_t),
            (&plain.batch.eps, &dropped.batch.eps),
        ] {
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
