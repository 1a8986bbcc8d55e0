//! The face stage: detection, tracking and 48x48 crops for each frame.
//!
//! Between full-frame searches only the region around each track is searched, at the track's
//! own scale ([`FaceDetector::detect_near`]). For live and paced input the full-frame search runs
//! on a thread of its own ([`FullSearch`]), so frames with tracks never wait for it: it takes the
//! newest frame whenever it is free (every `every` frames, or every frame while nothing is
//! tracked), and the faces it finds join the tracker on the frame its answer arrives. It starts
//! a search once the frames in the pipeline have been emitted ([`InFlight`]), in the gap before
//! the next frame, so that it does not take a core from their inference. Files read as fast as
//! possible search in line, so their output is the same on every run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};

use super::capture::Counters;
use super::{spawn, FaceJob, RunConfig};
use crate::capture::Frame;
use crate::error::Result;
use crate::face::{
    crop_face, distinct, DetectConfig, FaceBox, FaceDetector, NearDetector, Tracker,
};

/// Longest the full-frame search waits for the pipeline to empty before it starts anyway (when
/// frames come back to back, it never does).
const FULL_SEARCH_MAX_WAIT: Duration = Duration::from_millis(40);
/// Between the pieces of a full search (a BlazeFace tile, a second look, the rustface search),
/// the search waits for the frames in flight again, at most this long each time.
const PIECE_MAX_WAIT: Duration = Duration::from_millis(20);

/// How many frames are between the start of their face stage and their emission (or drop).
#[derive(Default)]
pub(super) struct InFlight {
    count: Mutex<usize>,
    emptied: Condvar,
}

/// One frame's place in [`InFlight`], given back when the frame's job is dropped.
pub(super) struct InFlightToken(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightToken {
        if let Ok(mut n) = self.count.lock() {
            *n += 1;
        }
        InFlightToken(self.clone())
    }

    /// Waits until no frame is in flight, or `max` has passed.
    fn wait_empty(&self, max: Duration) {
        if let Ok(n) = self.count.lock() {
            let _ = self.emptied.wait_timeout_while(n, max, |n| *n > 0);
        }
    }
}

impl Drop for InFlightToken {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.count.lock() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.emptied.notify_all();
            }
        }
    }
}

pub(super) fn face_loop(
    cfg: &RunConfig,
    rx: Receiver<Frame>,
    tx: Sender<FaceJob>,
    cancel: &AtomicBool,
    counters: &Counters,
) -> Result<()> {
    let mut detector = FaceDetector::new(cfg.detect.clone())?;
    let mut tracker = Tracker::new(cfg.tracker);
    let every = cfg.detect.every as usize;
    let in_flight = Arc::new(InFlight::default());
    let mut full = if cfg.async_detect {
        Some(FullSearch::start(cfg.detect.clone(), in_flight.clone())?)
    } else {
        None
    };
    for (n, frame) in rx.iter().enumerate() {
        // Stopping: frames still queued are counted, not detected.
        if cancel.load(Ordering::SeqCst) {
            counters.stopped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let token = in_flight.enter();
        let t = Instant::now();
        let queue_ms = (t - frame.captured).as_secs_f64() * 1e3;
        let (w, h) = (frame.width, frame.height);
        let due = n.is_multiple_of(every);
        let dets = match full.as_mut() {
            None if due => detector.detect_full(&frame.gray, w, h),
            _ => {
                let tracks = tracker.live();
                let mut dets: Vec<FaceBox> = tracks
                    .iter()
                    .filter_map(|(_, b)| detector.detect_near(&frame.gray, w, h, b))
                    .collect();
                if let Some(search) = full.as_mut() {
                    dets.extend(search.poll());
                    if due || tracks.is_empty() {
                        search.offer(&frame);
                    }
                }
                dets
            }
        };
        if cfg.stills {
            // A new scene: its faces are new faces.
            tracker.forget();
        }
        let mut dets = distinct(dets);
        if dets.len() > cfg.max_faces {
            // The largest faces are kept (the nearest people); the rest are counted and said.
            dets.sort_by(|a, b| (b.w * b.h).total_cmp(&(a.w * a.h)));
            counters
                .faces_left_out
                .fetch_add((dets.len() - cfg.max_faces) as u64, Ordering::Relaxed);
            dets.truncate(cfg.max_faces);
        }
        let faces = tracker.update(&dets);
        let detect_ms = t.elapsed().as_secs_f64() * 1e3;
        let c = Instant::now();
        let mut crops = Vec::with_capacity(faces.len() * 48 * 48);
        for (_, b) in &faces {
            crops.extend(crop_face(&frame.gray, w, h, b, cfg.margin, 48));
        }
        let job = FaceJob {
            frame,
            faces,
            crops,
            queue_ms,
            detect_ms,
            crop_ms: c.elapsed().as_secs_f64() * 1e3,
            done: Instant::now(),
            _in_flight: token,
        };
        if tx.send(job).is_err() {
            break;
        }
    }
    Ok(())
}

/// The full-frame search on its own thread: one frame at a time, the newest it is offered, each
/// started when the pipeline has emptied (or after [`FULL_SEARCH_MAX_WAIT`]).
struct FullSearch {
    frames: Sender<(Vec<u8>, u32, u32)>,
    found: Receiver<Vec<FaceBox>>,
    busy: bool,
}

impl FullSearch {
    fn start(cfg: DetectConfig, in_flight: Arc<InFlight>) -> Result<Self> {
        let (frames, todo) = bounded::<(Vec<u8>, u32, u32)>(1);
        let (done, found) = bounded(1);
        // Detached: it ends when `frames` closes, after at most the search in hand.
        spawn("fer-detect", move || {
            // The settings were validated by the face stage's own detector. This one only
            // searches whole frames, so it needs no detector for the regions around tracks.
            let cfg = DetectConfig {
                near: NearDetector::Rustface,
                ..cfg
            };
            let Ok(mut det) = FaceDetector::new(cfg) else {
                return;
            };
            for (gray, w, h) in todo {
                in_flight.wait_empty(FULL_SEARCH_MAX_WAIT);
                let mut yield_to_frames = || in_flight.wait_empty(PIECE_MAX_WAIT);
                let faces = det.detect_full_yielding(&gray, w, h, &mut yield_to_frames);
                if done.send(faces).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self {
            frames,
            found,
            busy: false,
        })
    }

    /// Hands `frame` over unless a search is still running.
    fn offer(&mut self, frame: &Frame) {
        if !self.busy
            && self
                .frames
                .try_send((frame.gray.clone(), frame.width, frame.height))
                .is_ok()
        {
            self.busy = true;
        }
    }

    /// The faces of the last search, once it has finished (in frame pixels).
    fn poll(&mut self) -> Vec<FaceBox> {
        match self.found.try_recv() {
            Ok(faces) => {
                self.busy = false;
                faces
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    /// The single-face still at 640x480, or None (said loudly) without ../shared.
    fn still() -> Option<Vec<u8>> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/media/stills/single_face_pyfeat.jpg");
        let Ok(img) = image::open(&p) else {
            eprintln!("!!! SKIPPED the face-stage test: {} not found", p.display());
            return None;
        };
        let g = crate::capture::color::gray_image(img);
        Some(
            image::imageops::resize(&g, 640, 480, image::imageops::FilterType::Triangle).into_raw(),
        )
    }

    /// Runs the face stage over `n` copies of `gray`, the full search in line or beside.
    fn stage(gray: &[u8], n: u64, async_detect: bool) -> Vec<Vec<u64>> {
        let cfg = RunConfig {
            async_detect,
            ..Default::default()
        };
        let (ftx, frx) = bounded(n as usize);
        let (jtx, jrx) = bounded(n as usize);
        let stage = std::thread::spawn(move || {
            face_loop(
                &cfg,
                frx,
                jtx,
                &AtomicBool::new(false),
                &Counters::default(),
            )
        });
        for seq in 0..n {
            let frame = Frame {
                seq,
                captured: Instant::now(),
                wall: SystemTime::now(),
                width: 640,
                height: 480,
                gray: gray.to_vec(),
                label: None,
                chroma: None,
                pts: None,
            };
            ftx.send(frame).unwrap();
            if async_detect {
                // Paced input: let the search beside the stage answer now and then.
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
        }
        drop(ftx);
        stage.join().unwrap().unwrap();
        jrx.iter()
            .map(|j: FaceJob| {
                assert_eq!(j.crops.len(), j.faces.len() * 48 * 48);
                j.faces.iter().map(|(id, _)| *id).collect()
            })
            .collect()
    }

    /// While a frame is in flight the search waits its full allowance; it goes on as soon as the
    /// last frame's token is dropped (the 10 s allowance is never reached).
    #[test]
    fn the_full_search_waits_for_the_frames_in_flight() {
        let in_flight = Arc::new(InFlight::default());
        let (a, b) = (in_flight.enter(), in_flight.enter());
        let t = Instant::now();
        in_flight.wait_empty(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30));
        drop(a);
        let waiter = {
            let in_flight = in_flight.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                in_flight.wait_empty(Duration::from_secs(10));
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(b);
        let waited = waiter.join().unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // Empty: no wait at all.
        in_flight.wait_empty(Duration::from_secs(10));
    }

    #[test]
    fn one_face_found_twice_is_kept_once() {
        let b = |x: f32| FaceBox {
            x,
            y: 10.0,
            w: 100.0,
            h: 100.0,
            score: 5.0,
            roll: None,
        };
        // The second overlaps the first (IoU 0.82); the third is another face.
        let kept = distinct(vec![b(0.0), b(10.0), b(300.0)]);
        assert_eq!(kept.iter().map(|k| k.x).collect::<Vec<_>>(), [0.0, 300.0]);
    }

    #[test]
    fn the_face_is_found_and_keeps_its_id_with_the_search_in_line_or_beside() {
        let Some(gray) = still() else { return };
        // In line: every frame, one face, one id.
        let ids = stage(&gray, 8, false);
        assert!(ids.iter().all(|f| f == &[1]), "{ids:?}");
        // Beside: once the first search answers, every frame has the face under one id.
        let ids = stage(&gray, 40, true);
        let first = ids.iter().position(|f| !f.is_empty()).expect("never found");
        assert!(ids[first..].iter().all(|f| f == &[1]), "{ids:?}");
    }
}
