//! `fer-cam eval`: accuracy, PAvPU, calibration and confusion of a model on a labelled split;
//! with `--through-pipeline`, of the same images rendered into frames and found by `run`'s face
//! stage.

use anyhow::{bail, Context, Result};

use super::{
    check_output, load_classifier, load_split, model_name, print_stdout, progress_bar, write_json,
};
use crate::cli::{EvalArgs, RenderArgs};
use fer_cam::eval::{evaluate, EvalOptions};
use fer_cam::harness::RenderConfig;
use fer_cam::pipeline::RunConfig;

pub fn eval(a: EvalArgs) -> Result<()> {
    if let Some(path) = &a.json {
        check_output(path, &a.classifier, &a.source.data)?;
    }
    let mut clf = load_classifier(&a.classifier)?;
    if a.batch_size == 0 {
        bail!("--batch-size 0 (must be at least 1)");
    }
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold {} (allowed 0..=1)", a.threshold);
    }
    let (split, label_rows_left_out) = load_split(&a.source, &a.split, a.limit)?;
    let data_name = match &a.source.labels {
        Some(l) => format!("{} with labels {}", a.source.data.display(), l.display()),
        None => a.source.data.display().to_string(),
    };
    if a.through_pipeline {
        return through_pipeline(&a, clf, &split, data_name);
    }
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
    report.data = data_name;
    report.split = a.split.clone();
    report.label_rows_left_out = label_rows_left_out;
    if let Some(path) = &a.json {
        write_json(path, &report, true)?;
    }
    print_stdout(&report.to_string())
}

/// `LO-HI` → (LO, HI).
fn range<T: std::str::FromStr>(flag: &str, text: &str) -> Result<(T, T)> {
    let parse = || -> Option<(T, T)> {
        let (lo, hi) = text.split_once('-')?;
        Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
    };
    parse().with_context(|| format!("--{flag} {text:?} (expected LOW-HIGH, e.g. 64-256)"))
}

fn render_config(r: &RenderArgs) -> Result<RenderConfig> {
    let (frame_width, frame_height) = super::run::parse_resolution(&r.render_frame)?;
    let (face_min, face_max) = range("render-face", &r.render_face)?;
    let cfg = RenderConfig {
        seed: r.render_seed,
        frame_width,
        frame_height,
        face_min,
        face_max,
        rotate_deg: r.render_roll,
        gain: range("render-gain", &r.render_gain)?,
        gamma: range("render-gamma", &r.render_gamma)?,
        downscale_p: r.render_downscale_p,
        downscale_min: r.render_downscale_min,
        blur_max: r.render_blur,
        noise_max: r.render_noise,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn through_pipeline(
    a: &EvalArgs,
    mut eval_clf: fer_cam::infer::Classifier,
    split: &fer_cam::data::Dataset,
    data_name: String,
) -> Result<()> {
    let render = render_config(&a.render)?;
    // The face stage as `fer-cam run` sets it up for stills: each render is an unrelated picture.
    let run_cfg = RunConfig {
        detect: super::run::detect_config(&a.face, false)?,
        margin: a.face.margin,
        status_every: 0.0,
        ..Default::default()
    };
    run_cfg.validate()?;
    let face_stage = format!(
        "{} full-frame search of every frame (detect width {}, min face {} px, rustface threshold {}), crop margin {}",
        a.face.full_detector,
        match run_cfg.detect.detect_width {
            0 => "full".to_string(),
            w => w.to_string(),
        },
        run_cfg.detect.min_face,
        run_cfg.detect.score_threshold,
        run_cfg.margin
    );
    fer_cam::log!(
        "through the pipeline: {} faces of {} rendered with {:?}",
        split.len(),
        a.split,
        render
    );
    let pipeline_clf = load_classifier(&a.classifier)?;
    let mut report = fer_cam::harness::run(
        pipeline_clf,
        &mut eval_clf,
        split,
        &run_cfg,
        &render,
        face_stage,
    )?;
    report.model = model_name(a.classifier.model.as_deref());
    report.data = data_name;
    report.split = a.split.clone();
    if let Some(path) = &a.json {
        write_json(path, &report, true)?;
    }
    print_stdout(&report.to_string())
}
