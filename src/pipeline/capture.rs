//! The capture stage: reads the source, paces file input (`--realtime`), thins it
//! (`--max-fps`), and hands frames to the face stage: without blocking on a live source (the
//! stalest queued frame is dropped and counted), blocking for a file (nothing is lost).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::RunConfig;
use crate::capture::{Frame, FrameSource, SourceEvent};
use crate::error::Result;

/// What the capture stage tells the emitter besides frames.
pub(super) enum Event {
    /// The source is open: its name and nominal rate. Sent before its first frame.
    Source(String, Option<f64>),
    Warning(String),
}

/// Counters the capture thread shares with the emitter.
#[derive(Default)]
pub(super) struct Counters {
    /// Frames dropped because the pipeline was busy.
    pub dropped: AtomicU64,
    /// Frames read but not processed because the run was stopping (a signal, stdout closed, a
    /// failed stage): those still queued, and one the capture stage held for a full queue.
    pub stopped: AtomicU64,
    /// Frames passed over by `--max-fps`.
    pub skipped: AtomicU64,
    /// Faces found beyond `--max-faces` in a frame, left out of it.
    pub faces_left_out: AtomicU64,
}

pub(super) fn capture_loop(
    cfg: &RunConfig,
    open: impl FnOnce() -> Result<Box<dyn FrameSource>>,
    tx: Sender<Frame>,
    stale: Receiver<Frame>,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
    counters: &Counters,
) -> Result<()> {
    let mut src = open()?;
    src.keep_color(cfg.annotate.is_some());
    let _ = events.send(Event::Source(src.name(), src.fps()));
    let pace = if cfg.realtime { src.fps() } else { None };
    let mut thin = Thinner::new(cfg.max_fps);
    let t0 = Instant::now();
    while !cancel.load(Ordering::SeqCst) {
        let frame = match src.next_event()? {
            SourceEvent::End => break,
            SourceEvent::Warning(w) => {
                let _ = events.try_send(Event::Warning(w));
                continue;
            }
            SourceEvent::Frame(f) => f,
        };
        if let Some(fps) = pace {
            let due = t0 + Duration::from_secs_f64(frame.seq as f64 / fps);
            // Sleep in short steps so a signal is noticed.
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                if cancel.load(Ordering::SeqCst) {
                    return Ok(());
                }
                thread::sleep(wait.min(Duration::from_millis(50)));
            }
        }
        // Media time where the source has it, so a file is thinned the same on every run.
        let at = frame.pts.unwrap_or_else(|| t0.elapsed().as_secs_f64());
        if !thin.keep(at) {
            counters.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut frame = frame;
        // Stamp the capture time when the frame enters the pipeline (after pacing).
        frame.captured = Instant::now();
        frame.wall = SystemTime::now();
        if cfg.live || cfg.realtime {
            // Queue this frame, dropping the stalest queued ones while the queue is full: the
            // newest frame always goes in. Each turn either drops one (the queue shrinks) or
            // finds it emptied by the face stage, so this ends.
            let mut pending = frame;
            loop {
                match tx.try_send(pending) {
                    Ok(()) => break,
                    Err(TrySendError::Full(f)) => {
                        if stale.try_recv().is_ok() {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        pending = f;
                    }
                    Err(TrySendError::Disconnected(_)) => return Ok(()),
                }
            }
        } else {
            // Files wait for the face stage, but never past cancellation: this thread also
            // holds a receiver (for dropping stale frames), so the queue never disconnects
            // while it blocks here.
            let mut pending = frame;
            loop {
                match tx.send_timeout(pending, Duration::from_millis(50)) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(f)) => {
                        if cancel.load(Ordering::SeqCst) {
                            counters.stopped.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        }
                        pending = f;
                    }
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

/// `--max-fps`: keeps frames on a grid of `1/max_fps` seconds of the source's time, so a 30 fps
/// source capped at 10 keeps every third frame (not every fourth, as "at least a gap since the
/// last one" does when frames arrive a hair early).
struct Thinner {
    gap: Option<f64>,
    next: Option<f64>,
}

impl Thinner {
    fn new(max_fps: f64) -> Self {
        Self {
            gap: (max_fps > 0.0).then(|| 1.0 / max_fps),
            next: None,
        }
    }

    /// Whether the frame at `t` seconds is kept.
    fn keep(&mut self, t: f64) -> bool {
        let Some(gap) = self.gap else {
            return true;
        };
        // A tenth of the gap of slack absorbs a camera's timing jitter.
        if self.next.is_some_and(|due| t < due - 0.1 * gap) {
            return false;
        }
        // The next slot follows the grid; after a pause (or a jump back), it restarts here.
        self.next = Some(match self.next {
            Some(due) if (t - due).abs() < gap => due + gap,
            _ => t + gap,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

    /// `frames` tiny frames at once, with a warning before frame `warn_at`.
    struct Fake {
        frames: u64,
        next: u64,
        warn_at: Option<u64>,
    }

    impl FrameSource for Fake {
        fn next_event(&mut self) -> Result<SourceEvent> {
            if self.warn_at == Some(self.next) {
                self.warn_at = None;
                return Ok(SourceEvent::Warning(format!("before frame {}", self.next)));
            }
            if self.next == self.frames {
                return Ok(SourceEvent::End);
            }
            self.next += 1;
            Ok(SourceEvent::Frame(Frame {
                seq: self.next - 1,
                captured: Instant::now(),
                wall: SystemTime::now(),
                width: 4,
                height: 4,
                gray: vec![0; 16],
                label: None,
                chroma: None,
                pts: None,
            }))
        }

        fn name(&self) -> String {
            "fake".into()
        }
    }

    /// Runs the capture stage over `frames` frames into a queue of `queue` that nobody reads
    /// (unless `reader` drains it), and returns the counters, the sequence numbers that reached
    /// the queue, and the events.
    fn capture(
        cfg: &RunConfig,
        frames: u64,
        queue: usize,
        slow_reader: bool,
    ) -> (Counters, Vec<u64>, Vec<Event>) {
        let (tx, rx) = bounded::<Frame>(queue);
        let (ev_tx, ev_rx) = bounded::<Event>(64);
        let reader = slow_reader.then(|| {
            let rx = rx.clone();
            thread::spawn(move || {
                let mut seen = Vec::new();
                while let Ok(f) = rx.recv() {
                    thread::sleep(Duration::from_millis(2));
                    seen.push(f.seq);
                }
                seen
            })
        });
        let counters = Counters::default();
        let src = Fake {
            frames,
            next: 0,
            warn_at: Some(3),
        };
        let stale = rx.clone();
        capture_loop(
            cfg,
            move || Ok(Box::new(src)),
            tx,
            stale,
            ev_tx,
            Arc::new(AtomicBool::new(false)),
            &counters,
        )
        .unwrap();
        let seen = match reader {
            Some(r) => {
                drop(rx);
                r.join().unwrap()
            }
            None => rx.try_iter().map(|f| f.seq).collect(),
        };
        (counters, seen, ev_rx.try_iter().collect())
    }

    #[test]
    fn a_live_source_drops_the_stalest_frames_and_counts_each() {
        let cfg = RunConfig {
            live: true,
            ..Default::default()
        };
        let (counters, queued, events) = capture(&cfg, 10, 2, false);
        // Nobody reads: the two newest frames wait, the eight before them were dropped.
        assert_eq!(queued, [8, 9]);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 8);
        assert_eq!(counters.skipped.load(Ordering::Relaxed), 0);
        assert!(matches!(&events[0], Event::Source(name, None) if name == "fake"));
        assert!(matches!(&events[1], Event::Warning(w) if w == "before frame 3"));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn max_fps_passes_frames_over_and_counts_them_apart_from_drops() {
        let cfg = RunConfig {
            live: true,
            max_fps: 0.5, // one frame per 2 s: the burst keeps only its first
            ..Default::default()
        };
        let (counters, queued, _) = capture(&cfg, 10, 4, false);
        assert_eq!(queued, [0]);
        assert_eq!(counters.skipped.load(Ordering::Relaxed), 9);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn max_fps_keeps_frames_on_a_grid_of_media_time() {
        // 30 fps capped at 10: every third frame, also with a little jitter.
        let mut t = Thinner::new(10.0);
        let kept: Vec<usize> = (0..30)
            .filter(|&i| t.keep(i as f64 / 30.0 + if i % 2 == 0 { 0.002 } else { -0.002 }))
            .collect();
        assert_eq!(kept, (0..30).step_by(3).collect::<Vec<_>>());
        // 25 fps capped at 10: 10 of 25 frames a second.
        let mut t = Thinner::new(10.0);
        assert_eq!((0..250).filter(|&i| t.keep(i as f64 / 25.0)).count(), 100);
        // No cap: everything.
        let mut t = Thinner::new(0.0);
        assert!((0..5).all(|i| t.keep(i as f64)));
    }

    #[test]
    fn a_file_waits_for_a_slow_reader_and_loses_nothing() {
        let cfg = RunConfig::default();
        assert!(!cfg.live && !cfg.realtime);
        let (counters, seen, _) = capture(&cfg, 20, 2, true);
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
    }
}
