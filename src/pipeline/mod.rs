//! The real-time pipeline: capture → face → inference → emitter, each a named thread joined by
//! bounded queues (DESIGN.md §1). The stages live in `capture.rs`, `face.rs` and `infer.rs`;
//! this file starts them, emits their results and ends the run.
//!
//! - Capture never blocks on a live source: when the face stage is busy the stalest queued frame
//!   is dropped and counted. File input without `--realtime` blocks instead (nothing is lost).
//! - Shutdown: the cancel flag (signal, end of input, stdout closed) stops capture; each stage
//!   ends when its input queue is empty and closed, so queued frames drain. A stage whose output
//!   queue is gone (the emitter left because stdout closed) stops at once.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select};

use crate::annotate::{AnnotateStats, Annotator};
use crate::capture::{Frame, FrameSource};
use crate::emit::{Body, Emitter, FaceOut, Latency, Percentiles};
use crate::error::{Error, Result};
use crate::face::{DetectConfig, FaceBox, TrackerConfig};
use crate::infer::Classifier;
use capture::{capture_loop, Counters, Event};
use face::face_loop;
use infer::infer_loop;

mod capture;
mod face;
mod infer;

/// The crop margin `run` uses by default. Chosen with `eval --through-pipeline` on PublicTest
/// (built-in fer2013 model, default renders, seed 0): accuracy over the faces found 60.98% at
/// 0.1 (crops 1.09 times the true square), 64.05% at 0.05 (1.00), 64.94% at 0.02 (0.95).
pub const DEFAULT_MARGIN: f32 = 0.02;

/// Faces classified per frame unless `--max-faces` says otherwise: a class photo fits, and a
/// frame of noise that "finds" thousands of faces cannot stall the run.
pub const DEFAULT_MAX_FACES: usize = 64;

/// Settings of one `fer-cam run`, validated before any thread starts.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub detect: DetectConfig,
    pub tracker: TrackerConfig,
    /// Crop margin around the detector's box, as a fraction of its side on each side.
    pub margin: f32,
    /// Weight of the newest probabilities in the per-track average (1.0: no smoothing).
    pub smooth: f32,
    /// Process at most this many frames per second (0: no limit).
    pub max_fps: f64,
    /// Pace file input at its nominal frame rate.
    pub realtime: bool,
    /// Whether the source is live (drop stale frames) or a file read as fast as possible (block).
    pub live: bool,
    /// Seconds between `status` lines (0: none).
    pub status_every: f64,
    /// Frames queued between capture and the face stage.
    pub queue: usize,
    /// Most faces classified in one batch.
    pub max_batch: usize,
    /// Most faces classified per frame (the largest); the rest are counted in
    /// [`RunStats::faces_left_out`].
    pub max_faces: usize,
    /// Also write every processed frame, annotated, as YUV4MPEG2 here (a new file or a FIFO), or
    /// for stills one PNG each into a folder.
    pub annotate: Option<PathBuf>,
    /// Run the full-frame face search on its own thread (live or paced video), so frames with
    /// tracks do not wait for it; otherwise it runs in line and a file's output is repeatable.
    pub async_detect: bool,
    /// Each frame is a scene of its own (unrelated stills): no track, id or smoothing carries
    /// from one frame to the next.
    pub stills: bool,
    /// What produced the output, for the `start` line.
    pub provenance: crate::emit::Provenance,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            detect: DetectConfig::default(),
            tracker: TrackerConfig::default(),
            margin: DEFAULT_MARGIN,
            smooth: 1.0,
            max_fps: 0.0,
            realtime: false,
            live: false,
            status_every: 5.0,
            queue: 2,
            max_batch: 32,
            max_faces: DEFAULT_MAX_FACES,
            annotate: None,
            async_detect: false,
            stills: false,
            provenance: crate::emit::Provenance::default(),
        }
    }
}

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        self.detect.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        if !(0.0..=1.0).contains(&self.margin) {
            return bad(format!("--margin {} (allowed 0..=1)", self.margin));
        }
        if !(self.smooth > 0.0 && self.smooth <= 1.0) {
            return bad(format!(
                "--smooth {} (allowed 0 < a <= 1; 1 disables smoothing)",
                self.smooth
            ));
        }
        if !(0.0..=1000.0).contains(&self.max_fps) {
            return bad(format!(
                "--max-fps {} (allowed 0..=1000; 0 = no limit)",
                self.max_fps
            ));
        }
        if !(self.status_every == 0.0 || (0.1..=3600.0).contains(&self.status_every)) {
            return bad(format!(
                "--status-every {} (0 for none, or 0.1..=3600 s)",
                self.status_every
            ));
        }
        if !(1..=1000).contains(&self.max_faces) {
            return bad(format!("--max-faces {} (allowed 1..=1000)", self.max_faces));
        }
        if !(1..=64).contains(&self.queue) || !(1..=1024).contains(&self.max_batch) {
            return bad(format!(
                "queue {} (1..=64) / max batch {} (1..=1024)",
                self.queue, self.max_batch
            ));
        }
        if let Some(p) = &self.annotate {
            crate::annotate::target(p, self.stills)?;
        }
        if !(0.0..=1.0).contains(&self.tracker.iou_threshold) {
            return bad(format!(
                "iou threshold {} (allowed 0..=1)",
                self.tracker.iou_threshold
            ));
        }
        Ok(())
    }
}

/// Totals of a finished run.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub frames: u64,
    pub faces: u64,
    /// Frames read and not processed: dropped by a busy live pipeline, plus `stopped`.
    pub dropped: u64,
    /// Of `dropped`: frames still in the pipeline when the run stopped (a signal, stdout
    /// closed, a failed stage).
    pub stopped: u64,
    pub warnings: u64,
    /// Faces the model gave no finite answer for (each also a `warning` line).
    pub failed_faces: u64,
    /// Faces beyond `--max-faces` in their frame, not classified.
    pub faces_left_out: u64,
    pub seconds: f64,
    pub latency: Percentiles,
    /// The median of each part of the frames' latency.
    pub latency_parts: Latency,
    /// Frames passed over by `--max-fps`.
    pub skipped: u64,
    /// The reader closed stdout.
    pub output_closed: bool,
    /// What `--annotate` wrote.
    pub annotate: Option<AnnotateStats>,
}

/// A frame after the face stage.
struct FaceJob {
    frame: Frame,
    faces: Vec<(u64, FaceBox)>,
    crops: Vec<u8>,
    /// From capture to the face stage taking the frame.
    queue_ms: f64,
    /// Detection and tracking.
    detect_ms: f64,
    crop_ms: f64,
    /// When the face stage finished with it.
    done: Instant,
    /// Marks the frame as in the pipeline until it is emitted or dropped.
    _in_flight: face::InFlightToken,
}

/// A frame after inference.
struct Classified {
    job: FaceJob,
    out: Vec<FaceOut>,
    /// Track ids of faces whose answer was not finite (left out of `out`).
    failed: Vec<u64>,
    /// From the face stage to inference taking the batch.
    wait_ms: f64,
    infer_ms: f64,
    /// When inference finished with it.
    done: Instant,
}

/// After a signal (or a closed stdout), how long the stages get to finish what they hold before
/// the run ends without them (a read from a silent stdin or a slow decode cannot be interrupted).
const STOP_GRACE: Duration = Duration::from_millis(700);

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<thread::JoinHandle<T>> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Msg(format!("cannot start thread {name}: {e}")))
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The `frame` line of a classified frame, and its capture-to-emit latency in ms.
fn frame_body(r: Classified, source: &str, dropped: u64) -> (Body, f64) {
    // One clock reading for the total and its last part, so the parts never add up to more.
    let now = Instant::now();
    let lat = (now - r.job.frame.captured).as_secs_f64() * 1e3;
    let body = Body::Frame {
        source: source.to_string(),
        frame: r.job.frame.seq,
        pts_s: r.job.frame.pts.map(|t| (t * 1e3).round() / 1e3),
        size: [r.job.frame.width, r.job.frame.height],
        file: r.job.frame.label,
        faces: r.out,
        latency_ms: Latency {
            capture_to_emit: round2(lat),
            queue: round2(r.job.queue_ms + r.wait_ms),
            detect: round2(r.job.detect_ms),
            crop: round2(r.job.crop_ms),
            infer: round2(r.infer_ms),
            emit: round2((now - r.done).as_secs_f64() * 1e3),
        },
        dropped,
    };
    (body, lat)
}

/// Frame rate of annotated output: the source's, or `--max-fps` when that is lower; stills
/// (no rate) play at one a second.
fn annotated_rate(source_fps: Option<f64>, max_fps: f64) -> f64 {
    match (source_fps, max_fps > 0.0) {
        (Some(f), true) => f.min(max_fps),
        (Some(f), false) => f,
        (None, true) => max_fps,
        (None, false) => 1.0,
    }
}

/// CPU time of this process in seconds (Linux: /proc/self/stat, USER_HZ = 100).
fn process_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = text.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// What the emitter thread knows of the source.
#[derive(Default)]
struct SourceInfo {
    name: Option<String>,
    fps: Option<f64>,
    /// The latest media time emitted.
    last_pts: Option<f64>,
}

/// Handles a capture event on the emitter thread: the source's opening writes the `start` line.
fn on_event<W: Write>(
    ev: Event,
    emitter: &mut Emitter<W>,
    stats: &mut RunStats,
    source: &mut SourceInfo,
    annotator: &mut Option<Annotator>,
    cfg: &RunConfig,
) -> std::io::Result<()> {
    match ev {
        Event::Source(name, fps) => {
            if let Some(a) = annotator.as_mut() {
                a.set_rate(annotated_rate(fps, cfg.max_fps));
            }
            emitter.emit(&Body::Start {
                run: Box::new(cfg.provenance.clone()),
                source: name.clone(),
                source_fps: fps,
                live: cfg.live,
                stills: cfg.stills,
            })?;
            source.name = Some(name);
            source.fps = fps;
        }
        Event::Warning(message) => {
            stats.warnings += 1;
            crate::log!("warning: {}", crate::log::escape(&message));
            emitter.emit(&Body::Warning {
                message,
                count: stats.warnings,
            })?;
        }
    }
    Ok(())
}

/// Runs the pipeline until the source ends, `cancel` is set, or the output closes.
///
/// `open` builds the source inside the capture thread. Lines go to `out`. Returns the totals,
/// or the first fatal error (after the frames before it and the summary were emitted). Once
/// `cancel` is set the stages drop what is queued, and the run ends within [`STOP_GRACE`] even
/// if a stage is blocked (its thread is then left to the process exit).
pub fn run<W: Write>(
    cfg: &RunConfig,
    open: impl FnOnce() -> Result<Box<dyn FrameSource>> + Send + 'static,
    classifier: Classifier,
    out: W,
    cancel: Arc<AtomicBool>,
) -> Result<RunStats> {
    cfg.validate()?;
    let start = Instant::now();
    let counters = Arc::new(Counters::default());
    let (frame_tx, frame_rx) = bounded::<Frame>(cfg.queue);
    let (job_tx, job_rx) = bounded::<FaceJob>(4);
    let (res_tx, res_rx) = bounded::<Classified>(8);
    let (ev_tx, ev_rx) = bounded::<Event>(256);
    // Started before the stages, so a path that cannot be written fails before any frame.
    let mut annotator = match &cfg.annotate {
        Some(p) => Some(Annotator::start(
            crate::annotate::target(p, cfg.stills)?,
            classifier.config().classes.clone(),
            !(cfg.live || cfg.realtime),
        )?),
        None => None,
    };

    let capture = {
        let (cfg, cancel, counters) = (cfg.clone(), cancel.clone(), counters.clone());
        let stale_rx = frame_rx.clone();
        spawn("fer-capture", move || {
            capture_loop(&cfg, open, frame_tx, stale_rx, ev_tx, cancel, &counters)
        })?
    };
    let face = {
        let (cfg, cancel, counters) = (cfg.clone(), cancel.clone(), counters.clone());
        spawn("fer-face", move || {
            face_loop(&cfg, frame_rx, job_tx, &cancel, &counters)
        })?
    };
    let infer = {
        let (cfg, cancel, counters) = (cfg.clone(), cancel.clone(), counters.clone());
        spawn("fer-infer", move || {
            infer_loop(&cfg, classifier, job_rx, res_tx, &cancel, &counters)
        })?
    };

    let mut source = SourceInfo::default();
    let mut emitter = Emitter::new(out, start);
    let mut stats = RunStats::default();
    let mut latencies = Vec::new();
    let mut parts = Vec::new();
    let mut last_status = (Instant::now(), 0u64, process_cpu_seconds());
    let status_every = (cfg.status_every > 0.0).then(|| Duration::from_secs_f64(cfg.status_every));
    let mut events = ev_rx.clone();
    let mut stopping: Option<Instant> = None;
    let write_result = (|| -> std::io::Result<()> {
        loop {
            if cancel.load(Ordering::SeqCst) {
                let since = *stopping.get_or_insert_with(Instant::now);
                if since.elapsed() >= STOP_GRACE {
                    break;
                }
            }
            // Wake often enough to notice a signal and to keep the status cadence.
            let tick = status_every
                .map_or(Duration::from_millis(100), |d| {
                    d.saturating_sub(last_status.0.elapsed())
                })
                .min(Duration::from_millis(100));
            select! {
                recv(res_rx) -> msg => {
                    let Ok(mut r) = msg else { break };
                    // The source's name was sent before its first frame: take it first.
                    while source.name.is_none() {
                        match ev_rx.try_recv() {
                            Ok(ev) => on_event(ev, &mut emitter, &mut stats, &mut source, &mut annotator, cfg)?,
                            Err(_) => break,
                        }
                    }
                    if let Some(t) = r.job.frame.pts {
                        source.last_pts = Some(source.last_pts.map_or(t, |l: f64| l.max(t)));
                    }
                    if let Some(a) = annotator.as_mut() {
                        let f = &mut r.job.frame;
                        let picture = crate::annotate::Picture {
                            width: f.width,
                            height: f.height,
                            luma: std::mem::take(&mut f.gray),
                            chroma: f.chroma.take(),
                            seq: f.seq,
                            file: f.label.clone(),
                        };
                        a.push(picture, &r.out, &cancel);
                    }
                    if !r.failed.is_empty() {
                        stats.failed_faces += r.failed.len() as u64;
                        on_event(
                            Event::Warning(format!(
                                "frame {}: no answer for face(s) {:?}: the model gave non-finite \
                                 probabilities (damaged weights or temperatures?)",
                                r.job.frame.seq, r.failed
                            )),
                            &mut emitter, &mut stats, &mut source, &mut annotator, cfg,
                        )?;
                    }
                    let name = source.name.as_deref().unwrap_or("unknown");
                    let (body, lat) =
                        frame_body(r, name, counters.dropped.load(Ordering::Relaxed));
                    latencies.push(lat);
                    if let Body::Frame { latency_ms, .. } = &body {
                        parts.push(*latency_ms);
                    }
                    stats.frames += 1;
                    if let Body::Frame { faces, .. } = &body {
                        stats.faces += faces.len() as u64;
                    }
                    emitter.emit(&body)?;
                },
                recv(events) -> ev => match ev {
                    Ok(ev) => on_event(ev, &mut emitter, &mut stats, &mut source, &mut annotator, cfg)?,
                    // Capture has finished: stop polling its event queue.
                    Err(_) => events = crossbeam_channel::never(),
                },
                default(tick) => {}
            }
            if status_every.is_some_and(|e| last_status.0.elapsed() >= e) {
                let secs = last_status.0.elapsed().as_secs_f64();
                let cpu = process_cpu_seconds();
                let cpu_percent = match (cpu, last_status.2) {
                    (Some(now), Some(before)) => 100.0 * (now - before) / secs.max(1e-9),
                    _ => -1.0,
                };
                emitter.emit(&Body::Status {
                    frames: stats.frames,
                    fps: round1((stats.frames - last_status.1) as f64 / secs.max(1e-9)),
                    cpu_percent: round1(cpu_percent),
                    dropped: counters.dropped.load(Ordering::Relaxed),
                    skipped: counters.skipped.load(Ordering::Relaxed),
                    faces: stats.faces,
                })?;
                last_status = (Instant::now(), stats.frames, cpu);
            }
        }
        Ok(())
    })();
    // Nothing downstream is left (input ended, a stage failed, a signal, or the reader left):
    // stop capture in every case so a live source does not run on.
    cancel.store(true, Ordering::SeqCst);
    let deadline = stopping.unwrap_or_else(Instant::now) + STOP_GRACE;
    drop(res_rx);
    drop(ev_rx);
    if let Err(e) = &write_result {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(Error::Msg(format!("writing output: {e}")));
        }
        stats.output_closed = true;
    }
    // Join the stages that finish in time; one blocked in a read or a decode is left behind.
    let results: Vec<Result<()>> = [("capture", capture), ("face", face), ("inference", infer)]
        .into_iter()
        .map(|(name, h)| {
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if !h.is_finished() {
                return Ok(());
            }
            h.join()
                .map_err(|_| Error::Msg(format!("{name} thread panicked")))?
        })
        .collect();
    stats.annotate = annotator.map(Annotator::finish);
    stats.stopped = counters.stopped.load(Ordering::Relaxed);
    stats.dropped = counters.dropped.load(Ordering::Relaxed) + stats.stopped;
    stats.skipped = counters.skipped.load(Ordering::Relaxed);
    stats.faces_left_out = counters.faces_left_out.load(Ordering::Relaxed);
    stats.seconds = start.elapsed().as_secs_f64();
    stats.latency = Percentiles::from_samples(&latencies);
    stats.latency_parts = Latency::medians(&parts);
    if stats.output_closed {
        return Ok(stats);
    }
    // The summary comes before any error, so a damaged input still gets its totals.
    let media_s = match (source.last_pts, source.fps) {
        (Some(t), Some(f)) => Some(round2(t + 1.0 / f)),
        (Some(t), None) => Some(round2(t)),
        _ => None,
    };
    let summary = Body::Summary {
        source: source.name.unwrap_or_else(|| "unavailable".into()),
        frames: stats.frames,
        faces: stats.faces,
        dropped: stats.dropped,
        skipped: stats.skipped,
        warnings: stats.warnings,
        faces_left_out: stats.faces_left_out,
        seconds: round2(stats.seconds),
        fps: round1(stats.frames as f64 / stats.seconds.max(1e-9)),
        source_fps: source.fps,
        media_s,
        latency_ms: stats.latency,
    };
    if let Err(e) = emitter.emit(&summary) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            stats.output_closed = true;
        } else {
            return Err(Error::Msg(format!("writing output: {e}")));
        }
    }
    for r in results {
        r?;
    }
    Ok(stats)
}
