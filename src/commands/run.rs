//! `fer-cam run` (the daemon: capture, faces, inference, JSON lines) and `fer-cam devices`.

use anyhow::{bail, Context, Result};

use super::load_classifier;
#[cfg(feature = "camera")]
use super::print_stdout;
use crate::cli::{FaceArgs, RunArgs};
use fer_cam::face::DetectConfig;

#[cfg(not(feature = "camera"))]
fn no_camera_support() -> anyhow::Error {
    anyhow::anyhow!(fer_cam::capture::NO_CAMERA_SUPPORT)
}

#[cfg(feature = "camera")]
pub fn devices() -> Result<()> {
    let lines = fer_cam::capture::camera::list_devices()?;
    if lines.is_empty() {
        fer_cam::log!("no cameras found");
        return Ok(());
    }
    print_stdout(&lines.join("\n"))
}

#[cfg(not(feature = "camera"))]
pub fn devices() -> Result<()> {
    Err(no_camera_support())
}

/// `640x480` → (640, 480).
pub fn parse_resolution(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| {
        anyhow::anyhow!("--resolution {s:?} (expected WIDTHxHEIGHT, e.g. 640x480)")
    })?;
    let (w, h): (u32, u32) = (w.trim().parse()?, h.trim().parse()?);
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        bail!("--resolution {s} (each side 16..=8192)");
    }
    Ok((w, h))
}

/// The face stage's detection settings for video or for stills (unrelated pictures: a full
/// search of each, at full size).
pub fn detect_config(a: &FaceArgs, video: bool) -> Result<DetectConfig> {
    Ok(DetectConfig {
        detect_width: a.detect_width.unwrap_or(if video { 320 } else { 0 }),
        every: if video { a.detect_every } else { 1 },
        min_face: a.min_face,
        score_threshold: a.det_threshold,
        near: a.detector.parse()?,
        full: a.full_detector.parse()?,
        ..Default::default()
    })
}

pub fn run_daemon(a: RunArgs) -> Result<()> {
    use fer_cam::capture::Input;
    use fer_cam::face::TrackerConfig;
    use fer_cam::pipeline::RunConfig;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let clf = load_classifier(&a.classifier)?;
    let (cam_w, cam_h) = parse_resolution(&a.resolution)?;
    if !(1..=240).contains(&a.fps) {
        bail!("--fps {} (allowed 1..=240)", a.fps);
    }
    #[cfg(not(feature = "camera"))]
    if a.camera.is_some() {
        return Err(no_camera_support());
    }
    let camera = a.camera.map(|index| Input::Camera {
        index,
        width: cam_w,
        height: cam_h,
        fps: a.fps,
    });
    let input = Input::select(&a.input, camera, a.live)?;
    let (video, live) = (input.is_video(), input.is_live());
    if a.sequence && video {
        bail!("--sequence is for stills (a video's frames are a sequence already)");
    }
    let detect = detect_config(&a.face, video || a.sequence)?;
    let sampler = clf.sampler();
    let provenance = fer_cam::emit::Provenance {
        version: env!("CARGO_PKG_VERSION").to_string(),
        model: clf.origin().clone(),
        classes: clf.config().classes.clone(),
        views: clf.tta(),
        samples: clf.samples_per_face(),
        steps: sampler.steps,
        seed: sampler.seed,
        smooth: a.smooth,
        detector: fer_cam::emit::DetectorSettings {
            full: a.face.full_detector.clone(),
            near: a.face.detector.clone(),
            detect_width: detect.detect_width,
            detect_every: detect.every,
            min_face: detect.min_face,
            threshold: detect.score_threshold,
            margin: a.face.margin,
        },
    };
    let cfg = RunConfig {
        detect,
        tracker: TrackerConfig::default(),
        margin: a.face.margin,
        smooth: a.smooth,
        max_fps: a
            .max_fps
            .unwrap_or(if a.camera.is_some() { 10.0 } else { 0.0 }),
        realtime: a.realtime,
        live,
        status_every: a.status_every,
        annotate: a.annotate.clone(),
        async_detect: video && (live || a.realtime),
        stills: !video && !a.sequence,
        max_faces: a.max_faces,
        provenance,
        ..Default::default()
    };
    cfg.validate()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let cam_cancel = cancel.clone();
    let open = move || input.open(move || cam_cancel.load(Ordering::SeqCst));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone()).context("installing signal handlers")?;
    }
    let stdout = std::io::stdout().lock();
    let stats = fer_cam::pipeline::run(&cfg, open, clf, stdout, cancel)?;
    let mut annotate_failed = None;
    if let (Some(path), Some(an)) = (&a.annotate, &stats.annotate) {
        annotate_failed = an.error.clone();
        fer_cam::log!(
            "annotate: {} frames written to {}, {} dropped{}",
            an.written,
            path.display(),
            an.dropped,
            an.error
                .as_ref()
                .map(|e| format!("; stopped early: {e}"))
                .unwrap_or_default()
        );
    }
    // Frames the run did not process are said whether or not --stats was asked for.
    if stats.dropped > 0 || stats.skipped > 0 {
        let seen = stats.frames + stats.dropped + stats.skipped;
        let mut parts = Vec::new();
        let busy = stats.dropped - stats.stopped;
        if busy > 0 {
            parts.push(format!(
                "{busy} dropped because the pipeline was busy (a live source: the stalest frame \
                 goes when a new one arrives)"
            ));
        }
        if stats.stopped > 0 {
            parts.push(format!(
                "{} still in the pipeline when the run stopped{}",
                stats.stopped,
                if stats.output_closed {
                    " (stdout was closed)"
                } else {
                    ""
                }
            ));
        }
        if stats.skipped > 0 {
            parts.push(format!("{} skipped by --max-fps", stats.skipped));
        }
        fer_cam::log!(
            "{} of {seen} frames were not processed: {}",
            stats.dropped + stats.skipped,
            parts.join("; ")
        );
    }
    if stats.faces_left_out > 0 {
        fer_cam::log!(
            "{} face(s) beyond --max-faces {} were left out of their frames (the largest were \
             kept)",
            stats.faces_left_out,
            a.max_faces
        );
    }
    if let Some(e) = annotate_failed {
        bail!("--annotate stopped early: {e}");
    }
    if stats.failed_faces > 0 {
        bail!(
            "the model gave non-finite probabilities for {} face(s), reported as warnings and \
             left out of the frames (is the model damaged?)",
            stats.failed_faces
        );
    }
    if a.stats {
        fer_cam::log!(
            "frames {} in {:.2} s ({:.1} fps), faces {}, dropped {}, warnings {}; capture-to-emit ms: p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1}",
            stats.frames,
            stats.seconds,
            stats.frames as f64 / stats.seconds.max(1e-9),
            stats.faces,
            stats.dropped,
            stats.warnings,
            stats.latency.p50,
            stats.latency.p95,
            stats.latency.p99,
            stats.latency.max
        );
        let m = &stats.latency_parts;
        fer_cam::log!(
            "median ms per part: queue {:.2}, detect {:.2}, crop {:.2}, infer {:.2}, emit {:.2}",
            m.queue,
            m.detect,
            m.crop,
            m.infer,
            m.emit
        );
    }
    Ok(())
}
