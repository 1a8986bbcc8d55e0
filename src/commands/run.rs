//! `fer-cam run` (the daemon: capture, faces, inference, JSON lines) and `fer-cam devices`.

use anyhow::{bail, Context, Result};

use super::load_classifier;
#[cfg(feature = "camera")]
use super::print_stdout;
use crate::cli::RunArgs;

#[cfg(not(feature = "camera"))]
fn no_camera_support() -> anyhow::Error {
    anyhow::anyhow!(
        "this build has no camera support (rebuild with `--features camera`), or feed frames \
         through ffmpeg: see README, \"Sharing the camera\""
    )
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
fn parse_resolution(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| {
        anyhow::anyhow!("--resolution {s:?} (expected WIDTHxHEIGHT, e.g. 640x480)")
    })?;
    let (w, h): (u32, u32) = (w.trim().parse()?, h.trim().parse()?);
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        bail!("--resolution {s} (each side 16..=8192)");
    }
    Ok((w, h))
}

pub fn run_daemon(a: RunArgs) -> Result<()> {
    use fer_cam::capture::{FrameSource, ImageSource, InputKind, Y4mSource};
    use fer_cam::face::{DetectConfig, TrackerConfig};
    use fer_cam::pipeline::RunConfig;
    use std::sync::atomic::AtomicBool;
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
    if a.input.is_empty() && a.camera.is_none() {
        bail!("give --input FILE.y4m, --input - (YUV4MPEG2 on stdin), image files, or --camera N");
    }
    let camera = a.camera;
    for p in &a.input {
        fer_cam::capture::refuse_compressed(p)?;
    }
    let kind = match a.input.as_slice() {
        [one] => InputKind::detect(one)?,
        _ => InputKind::Images,
    };
    let stdin = kind == InputKind::Stdin;
    let stream = kind == InputKind::Stream;
    let y4m = kind == InputKind::Y4mFile || stream;
    let cfg = RunConfig {
        detect: DetectConfig {
            detect_width: a
                .detect_width
                .unwrap_or(if stdin || y4m || camera.is_some() {
                    320
                } else {
                    0
                }),
            // Stills are unrelated pictures: detect on every one.
            every: if stdin || y4m || camera.is_some() {
                a.detect_every
            } else {
                1
            },
            min_face: a.min_face,
            score_threshold: a.det_threshold,
            ..Default::default()
        },
        tracker: TrackerConfig::default(),
        margin: a.margin,
        smooth: a.smooth,
        max_fps: a
            .max_fps
            .unwrap_or(if camera.is_some() { 10.0 } else { 0.0 }),
        realtime: a.realtime,
        live: stdin || stream || camera.is_some(),
        status_every: a.status_every,
        annotate: a.annotate.clone(),
        ..Default::default()
    };
    cfg.validate()?;
    let inputs = a.input.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    let cam_cancel = cancel.clone();
    let cam_fps = a.fps;
    let open = move || -> fer_cam::Result<Box<dyn FrameSource>> {
        #[cfg(feature = "camera")]
        if let Some(index) = camera {
            use fer_cam::capture::camera::CameraSource;
            use fer_cam::capture::{Backoff, Reconnecting};
            let reopen = move || -> fer_cam::Result<Box<dyn FrameSource>> {
                Ok(Box::new(CameraSource::open(index, cam_w, cam_h, cam_fps)?))
            };
            // The first open must succeed: a missing or busy camera is an error, not a retry loop.
            let first = CameraSource::open(index, cam_w, cam_h, cam_fps)?;
            let src = Reconnecting::new(format!("camera:{index}"), reopen, Backoff::default())
                .with_source(Box::new(first))
                .with_cancel(move || cam_cancel.load(std::sync::atomic::Ordering::SeqCst));
            return Ok(Box::new(src));
        }
        #[cfg(not(feature = "camera"))]
        let _ = (&cam_cancel, cam_fps, cam_w, cam_h);
        if stdin {
            Ok(Box::new(Y4mSource::new(std::io::stdin(), "stdin")?))
        } else if y4m {
            let p = &inputs[0];
            let f = std::fs::File::open(p).map_err(|e| fer_cam::Error::io(p, e))?;
            Ok(Box::new(Y4mSource::new(
                f,
                format!("file:{}", p.display()),
            )?))
        } else {
            Ok(Box::new(ImageSource::new(&inputs)?))
        }
    };
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone()).context("installing signal handlers")?;
    }
    let stdout = std::io::stdout().lock();
    let stats = fer_cam::pipeline::run(&cfg, open, clf, stdout, cancel)?;
    if let (Some(path), Some(an)) = (&a.annotate, &stats.annotate) {
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
    }
    Ok(())
}
