//! The three stages: Barlow Twins, the supervised f_φ, and CARD's ε_θ on frozen features. Each
//! builds its model, its batch source and its step, and hands them to the one epoch loop
//! ([`super::epochs::run_epochs`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

use super::checkpoint::{load_vars, vars_with_prefix, StageRun};
use super::epochs::{
    run_epochs, CardRows, CardSource, EpochScore, LoaderSource, LrSchedule, Throughput, Y0Rows,
};
use super::loader::{self, EpochPlan};
use super::probe::knn_accuracy;
use super::targets::{class_targets, smoothed_targets};
use super::teacher::Teacher;
use super::{
    mix_seed, Keep, Monitor, Stage, StageConfig, StageSummary, Targets, TrainConfig, TrainData,
};
use crate::config::ModelConfig;
use crate::data::{Dataset, FACE_PIXELS};
use crate::error::{Error, Result};
use crate::metrics;
use crate::model::barlow::{barlow_twins_loss, Projector};
use crate::model::{sample_probs_rows, seeded_init, FerModel};

fn normalised_batch(
    data: &Dataset,
    idx: std::ops::Range<usize>,
    cfg: &ModelConfig,
    dev: &Device,
) -> Result<Tensor> {
    let px = &data.pixels[idx.start * FACE_PIXELS..idx.end * FACE_PIXELS];
    let mut v = Vec::with_capacity(px.len());
    for face in px.chunks_exact(FACE_PIXELS) {
        cfg.input.normalise_into(face, &mut v);
    }
    Ok(Tensor::from_vec(v, (idx.len(), 1, 48, 48), dev)?)
}

/// Calls `each` with the encoder features of every batch of `data` in order (eval mode, no
/// augmentation), detached: the weights are training variables, and an attached result would
/// keep the whole forward graph (every activation of every batch) alive. With a `stop` monitor,
/// a stop asked for ends the pass before its next batch ([`Monitor::check_pass`], naming
/// `stage`).
fn feature_batches(
    model: &FerModel,
    data: &Dataset,
    cfg: &ModelConfig,
    dev: &Device,
    stop: Option<(&Monitor, Stage)>,
    mut each: impl FnMut(Tensor) -> Result<()>,
) -> Result<()> {
    let bs = 128;
    for start in (0..data.len()).step_by(bs) {
        if let Some((monitor, stage)) = stop {
            monitor.check_pass(stage, "while computing f_phi's features", start, data.len())?;
        }
        let xs = normalised_batch(data, start..(start + bs).min(data.len()), cfg, dev)?;
        each(model.features(&xs, false)?.detach())?;
    }
    Ok(())
}

/// Encoder features of every image (eval mode, no augmentation).
pub(super) fn features(
    model: &FerModel,
    data: &Dataset,
    cfg: &ModelConfig,
    dev: &Device,
) -> Result<Tensor> {
    let mut feats = Vec::new();
    feature_batches(model, data, cfg, dev, None, |f| {
        feats.push(f);
        Ok(())
    })?;
    Ok(Tensor::cat(&feats, 0)?)
}

/// Encoder features and f_φ probabilities of every image (eval mode, no augmentation); `stop`
/// as in [`feature_batches`].
fn features_and_fphi(
    model: &FerModel,
    data: &Dataset,
    cfg: &ModelConfig,
    dev: &Device,
    stop: Option<(&Monitor, Stage)>,
) -> Result<(Tensor, Tensor)> {
    let mut feats = Vec::new();
    let mut probs = Vec::new();
    feature_batches(model, data, cfg, dev, stop, |f| {
        probs.push(candle_nn::ops::softmax(&model.head_logits(&f)?, D::Minus1)?.detach());
        feats.push(f);
        Ok(())
    })?;
    Ok((Tensor::cat(&feats, 0)?, Tensor::cat(&probs, 0)?))
}

/// f_φ accuracy on a dataset.
fn fphi_accuracy(model: &FerModel, data: &Dataset, cfg: &ModelConfig, dev: &Device) -> Result<f64> {
    let (_, probs) = features_and_fphi(model, data, cfg, dev, None)?;
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
    let c = logits.dims2()?.1;
    soft_cross_entropy(logits, smoothed_targets(labels, c, eps))
}

/// Cross-entropy against soft targets `(B, C)` given flat, averaged over the batch.
fn soft_cross_entropy(logits: &Tensor, targets: Vec<f32>) -> Result<Tensor> {
    let targets = Tensor::from_vec(targets, logits.dims2()?, logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((targets * logp)?.sum(D::Minus1)?.mean_all()?.neg()?)
}

/// Stability training's term: `KL(p ‖ q)` averaged over the batch, with `p = softmax(clean)`
/// held fixed (no gradient) and `q = softmax(changed)`, so only the changed copy's answer moves
/// towards the clean one's.
fn consistency_loss(clean: &Tensor, changed: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&clean.detach(), D::Minus1)?;
    let logq = candle_nn::ops::log_softmax(changed, D::Minus1)?;
    Ok((logp.exp()? * (logp - logq)?)?.sum(D::Minus1)?.mean_all()?)
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
        input: cfg.model.input.clone(),
        draw_labels: false,
        mixup: 0.0,
        perturb: None,
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

/// The summary of a resumed stage whose `epochs` were all run before (its model written now if
/// no epoch wrote one), so that what only its epochs need (a teacher's pass, CARD's features)
/// is not computed again for nothing; `None` while epochs are left.
fn finished_already(
    run: &StageRun,
    epochs: usize,
    monitor: &mut Monitor,
) -> Result<Option<StageSummary>> {
    if run.epochs_done < epochs {
        return Ok(None);
    }
    (monitor.note)(&format!(
        "{}: all {epochs} epochs done in an earlier run ({})",
        run.stage.name(),
        run.cfg.run_dir.display()
    ));
    let dir = run.model_dir_or_save()?;
    Ok(Some(summary(run, &Throughput::default(), dir)))
}

/// Stage 1: Barlow Twins on unlabeled faces (Training pixels, labels ignored, plus extras).
pub fn train_ssl(
    cfg: &TrainConfig,
    data: &TrainData,
    dev: &Device,
    resume: bool,
    monitor: &mut Monitor,
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
    if let Some(done) = finished_already(&run, o.epochs, monitor)? {
        return Ok(done);
    }
    let mut source =
        LoaderSource::new(|epoch| epoch_plan(cfg, Stage::Ssl, &data.unlabeled, o, 2, epoch));
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
    // The features' kNN accuracy on PublicTest after each epoch (reported, not selected on).
    let mut score = |_epoch: usize| -> Result<EpochScore> {
        Ok(EpochScore::Watch {
            key: "knn_accuracy",
            label: "kNN on PublicTest",
            value: knn_accuracy(
                &model,
                &data.train,
                &data.val,
                cfg.ssl.knn_references,
                &cfg.model,
                dev,
            )?,
        })
    };
    let tput = run_epochs(
        &mut run,
        &mut source,
        &LrSchedule::of(o),
        monitor,
        &mut step,
        &mut score,
        serde_json::json!({}),
    )?;
    Ok(summary(&run, &tput, run.model_dir_or_save()?))
}

/// Stage 2: f_φ (encoder + linear head) with cross-entropy, from `init` (an SSL model directory)
/// or from scratch. Keeps the epoch with the best PublicTest accuracy.
pub fn train_classifier(
    cfg: &TrainConfig,
    data: &TrainData,
    init: Option<&Path>,
    dev: &Device,
    resume: bool,
    monitor: &mut Monitor,
) -> Result<StageSummary> {
    let (vm, model) = new_model(cfg, dev, mix_seed(&[cfg.seed, Stage::Classifier.id()]))?;
    if let Some(dir) = init {
        crate::model::read_config(dir).and_then(|c| {
            if cfg.model.encoder.loads_weights_of(&c.encoder) {
                Ok(())
            } else {
                Err(Error::model(
                    dir,
                    "its encoder differs from the training config's (only a 3x3 stem's stride may)",
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
    let cls = &cfg.classifier;
    let score_now = |m: &FerModel| fphi_accuracy(m, &data.val, &cfg.model, dev);
    if cls.keep == Keep::Last
        && run.epochs_done >= o.epochs
        && run.best_epoch != Some(run.epochs_done)
    {
        // Finished choosing the best epoch; the checkpoint holds the last epoch's weights.
        (monitor.note)(&format!(
            "classifier: keeping the last epoch's weights ({}), not epoch {}'s as chosen before",
            run.epochs_done,
            run.best_epoch.map_or("?".to_string(), |e| e.to_string())
        ));
        run.best_val = Some(score_now(&model)?);
        run.best_epoch = Some(run.epochs_done);
        run.save_model()?;
        run.checkpoint()?;
    }
    if let Some(done) = finished_already(&run, o.epochs, monitor)? {
        return Ok(done);
    }
    let teacher = match &cfg.classifier.distill {
        Some(d) => {
            (monitor.note)(&format!(
                "classifier: the teacher's answers on {} training images{}",
                data.train.len(),
                match d.teachers().count() {
                    1 => String::new(),
                    n => format!(" (the mean of {n} models)"),
                }
            ));
            let start = std::time::Instant::now();
            let teacher = Teacher::compute(d, &data.train, &cfg.model, dev, monitor)?;
            (monitor.note)(&format!(
                "classifier: the teacher's answers took {:.0} s",
                start.elapsed().as_secs_f64()
            ));
            Some(teacher)
        }
        None => None,
    };
    let mut source = LoaderSource::new(|epoch| {
        let mut plan = epoch_plan(cfg, Stage::Classifier, &data.train, o, 1, epoch);
        plan.draw_labels = cls.targets == Targets::Draw;
        plan.mixup = cls.mixup;
        plan.perturb = cls.consistency.as_ref().map(|k| k.webcam.clone());
        plan
    });
    let mut step = |b: &loader::Batch| -> Result<Tensor> {
        // With stability training, the changed copies follow in the same pass (batch-norm sees
        // both).
        let n = b.len();
        let copies = if cls.consistency.is_some() { 2 } else { 1 };
        let xs = b.views[..copies]
            .iter()
            .map(|v| batch_tensor(v, n, dev))
            .collect::<Result<Vec<_>>>()?;
        let all = model.head_logits(&model.features(&Tensor::cat(&xs, 0)?, true)?)?;
        let logits = all.narrow(0, 0, n)?;
        let own = class_targets(
            cls.targets,
            &data.train,
            &b.rows,
            &b.labels,
            cls.label_smoothing,
            cls.single_label_weight,
        );
        let targets = match &teacher {
            Some(t) => t.mix(&b.rows, own),
            None => own,
        };
        let targets = match &b.mix {
            Some(m) => m.apply(&targets, data.train.class_names.len()),
            None => targets,
        };
        let loss = soft_cross_entropy(&logits, targets)?;
        match &cls.consistency {
            Some(k) => {
                let changed = all.narrow(0, n, n)?;
                Ok((loss + (consistency_loss(&logits, &changed)? * k.weight)?)?)
            }
            None => Ok(loss),
        }
    };
    let mut score = |_epoch: usize| -> Result<EpochScore> {
        let v = score_now(&model)?;
        Ok(match cls.keep {
            Keep::Best => EpochScore::Select(v),
            Keep::Last => EpochScore::Last(v),
        })
    };
    let tput = run_epochs(
        &mut run,
        &mut source,
        &LrSchedule::of(o),
        monitor,
        &mut step,
        &mut score,
        serde_json::json!({}),
    )?;
    Ok(summary(&run, &tput, run.model_dir_or_save()?))
}

/// Stage 3: CARD's ε_θ with the encoder and f_φ of `init` frozen. Features are computed once, so
/// the stage costs one encoder pass over the data plus small MLP steps.
pub fn train_card(
    cfg: &TrainConfig,
    data: &TrainData,
    init: &Path,
    dev: &Device,
    resume: bool,
    monitor: &mut Monitor,
) -> Result<StageSummary> {
    let (vm, model) = new_model(cfg, dev, mix_seed(&[cfg.seed, Stage::Card.id()]))?;
    let init_cfg = crate::model::read_config(init)?;
    if init_cfg.encoder != cfg.model.encoder
        || init_cfg.classes != cfg.model.classes
        || init_cfg.input.norm != cfg.model.input.norm
    {
        return Err(Error::model(
            init,
            "its encoder, classes or input normalisation differ from the training config's",
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
    if let Some(done) = finished_already(&run, c.epochs, monitor)? {
        return Ok(done);
    }
    let t0 = Instant::now();
    (monitor.note)(&format!(
        "card: f_phi's features of {} training and {} PublicTest images",
        data.train.len(),
        data.val.len()
    ));
    let stop = Some((&*monitor, Stage::Card));
    let (train_feats, train_f) = features_and_fphi(&model, &data.train, &cfg.model, dev, stop)?;
    let (val_feats, val_f) = features_and_fphi(&model, &data.val, &cfg.model, dev, stop)?;
    let feature_seconds = t0.elapsed().as_secs_f64();
    let schedule = model.schedule().clone();
    let mut source = CardSource::new(
        &train_feats,
        &train_f,
        &data.train,
        Y0Rows {
            kind: c.y0,
            single_weight: cfg.classifier.single_label_weight,
        },
        &schedule,
        c.batch_size,
        c.feature_dropout,
        cfg.seed,
        dev,
    );
    let mut step = |b: &CardRows| -> Result<Tensor> {
        let eps_hat = model
            .card
            .forward(&b.feats, &b.batch.y_t, &b.f, &b.batch.t, true)?;
        Ok(b.batch.loss(&eps_hat)?)
    };
    let labels: Vec<usize> = data.val.labels.iter().map(|&l| l as usize).collect();
    let mut score = |epoch: usize| -> Result<EpochScore> {
        // PublicTest accuracy of the CARD majority vote, sampled 256 images at a time.
        let mut pred: Vec<usize> = Vec::with_capacity(data.val.len());
        for lo in (0..data.val.len()).step_by(256) {
            let len = 256.min(data.val.len() - lo);
            let mut rngs: Vec<_> = (lo..lo + len)
                .map(|i| crate::rngs::keyed_rng(&[cfg.seed, 99, epoch as u64, i as u64]))
                .collect();
            let y0 = model.sample(
                &val_feats.narrow(0, lo, len)?,
                &val_f.narrow(0, lo, len)?,
                c.val_samples,
                cfg.model.card.steps,
                &mut rngs,
            )?;
            let probs = sample_probs_rows(
                &y0.flatten_all()?.to_vec1::<f32>()?,
                cfg.model.num_classes(),
                cfg.model.card.temperature,
            );
            let summaries = metrics::summarize_faces(
                &probs,
                c.val_samples,
                cfg.model.num_classes(),
                cfg.model.card.alpha,
            );
            pred.extend(summaries.iter().map(|s| s.label));
        }
        Ok(EpochScore::Select(metrics::accuracy(&pred, &labels)))
    };
    let lr = LrSchedule {
        epochs: c.epochs,
        base_lr: c.lr,
        warmup_epochs: 0.0,
    };
    let tput = run_epochs(
        &mut run,
        &mut source,
        &lr,
        monitor,
        &mut step,
        &mut score,
        serde_json::json!({ "feature_seconds": feature_seconds }),
    )?;
    Ok(summary(&run, &tput, run.model_dir_or_save()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    #[test]
    fn the_consistency_term_is_kl_and_moves_only_the_changed_copy() {
        use candle_core::Var;
        // Row 0: p = [0.5, 0.5], q = [0.25, 0.75]: 0.5 ln 2 + 0.5 ln(2/3) = 0.143841.
        // Row 1: identical logits: 0.
        let clean = Var::new(&[[0f32, 0.0], [1.0, 2.0]], &Device::Cpu).unwrap();
        let changed = Var::new(&[[0f32, 3f32.ln()], [1.0, 2.0]], &Device::Cpu).unwrap();
        let loss = consistency_loss(clean.as_tensor(), changed.as_tensor()).unwrap();
        let v = loss.to_scalar::<f32>().unwrap();
        let want = 0.143_841_04 / 2.0;
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
        let grads = loss.backward().unwrap();
        assert!(grads.get(clean.as_tensor()).is_none());
        let g = grads
            .get(changed.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // d/dz of KL(p ‖ softmax(z)) is (q − p) / batch.
        let hand = [[-0.125f32, 0.125], [0.0, 0.0]];
        for (r, h) in g.iter().zip(hand) {
            for (a, b) in r.iter().zip(h) {
                assert!((a - b).abs() < 1e-6, "{g:?}");
            }
        }
    }

    #[test]
    fn soft_cross_entropy_hand_values() {
        // Row 0: logits [0, ln 3] → p = [0.25, 0.75], votes [0.5, 0.5]:
        //   −(0.5 ln 0.25 + 0.5 ln 0.75) = 0.836988.
        // Row 1: logits [0, 0] → p = [0.5, 0.5], one-hot [1, 0]: ln 2 = 0.693147.
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [0.0, 0.0]], &Device::Cpu).unwrap();
        let loss = soft_cross_entropy(&logits, vec![0.5, 0.5, 1.0, 0.0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = (0.836_988_1 + std::f32::consts::LN_2) / 2.0;
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        // Through class_targets: FER+-style votes with smoothing 0 give the same targets.
        let data = Dataset {
            class_names: vec!["a".into(), "b".into()],
            split_names: vec!["Training".into()],
            pixels: vec![0; 2 * FACE_PIXELS],
            labels: vec![0, 0],
            splits: vec![0, 0],
            soft: vec![0.5, 0.5, 1.0, 0.0],
            single_labels: Vec::new(),
            strict_majority: Vec::new(),
            seen_in_training: Vec::new(),
        };
        let t = class_targets(Targets::Votes, &data, &[0, 1], &[0, 0], 0.0, 0.0);
        assert_eq!(t, vec![0.5, 0.5, 1.0, 0.0]);
    }

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
            ..Default::default()
        };
        let (f, p) = features_and_fphi(&model, &data, &cfg.model, &dev, None).unwrap();
        assert_eq!(f.dims(), &[3, 16]);
        assert_eq!(p.dims(), &[3, 7]);
        assert!(!f.track_op() && !p.track_op());
        // CARD's pass over the data stops when asked, before its next batch.
        let stop = std::sync::atomic::AtomicBool::new(true);
        let (mut progress, mut note) = (|_: &crate::train::Progress| {}, |_: &str| {});
        let monitor = Monitor {
            progress: &mut progress,
            note: &mut note,
            stop: &stop,
        };
        let e = features_and_fphi(
            &model,
            &data,
            &cfg.model,
            &dev,
            Some((&monitor, Stage::Card)),
        )
        .expect_err("a stopped pass fails")
        .to_string();
        assert!(
            e.contains("stage card interrupted") && e.contains("0 of 3") && e.contains("--resume"),
            "{e}"
        );
    }
}
