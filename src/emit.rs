//! The JSON-lines output of `fer-cam run`: one object per line on stdout, schema version 1.
//!
//! Every line has `"v": 1`, a `"type"`, a wall-clock `"ts"` (RFC 3339, UTC, milliseconds) and
//! `"mono_ms"` (monotonic milliseconds since the run started). Types:
//!
//! - `start`: the first line, before any frame — what produced the file: `version`
//!   (fer-cam's), `model` `{name, sha256}` (of the weights file), `classes`, `views`, `samples`,
//!   `steps`, `seed`, `smooth`, `detector` (its settings), `source`, `source_fps` (`null` when
//!   the source has no rate: stills), `live` (stale frames are dropped when busy) and
//!   `stills` (each still is a scene of its own: ids and smoothing do not cross them).
//! - `frame`: one per processed frame —
//!   `source`, `frame` (the source's frame number, from 0), `pts_s` (media time: seconds into
//!   the recording, from the frame number and the video's rate or the camera's clock; `null`
//!   for stills), `size` `[w, h]`, optional `file` (stills), `faces` (below), `latency_ms` `{capture_to_emit, queue, detect, crop, infer,
//!   emit}`, and `dropped` (frames dropped so far because the pipeline was busy).
//!   Each face: `id` (track id, stable across frames, never reused), `box` `[x, y, w, h]` in
//!   source pixels, `det_score` (the detector's score: BlazeFace's probability, 0-1, or
//!   rustface's score, about 2-40, for a face only rustface found), optional `roll_deg` (head roll, degrees:
//!   the tilt of the line from the eye on the image's left to the one on its right, clockwise
//!   in the image; present when BlazeFace found the face, which gives the eyes; the crop is
//!   turned by the part beyond 8°), `label` (CARD majority vote), `probs` and `votes` (objects keyed
//!   by class name, in the model's class order), `certain` (CARD's paired t-test between the two
//!   most-voted classes, p < α), `p_value` (`null` when the test is undefined), `entropy` (nats,
//!   of `probs`).
//! - `status`: periodic health — `frames`, `fps` (processed frames per second since the last
//!   status), `cpu_percent` (this process, 100 = one core), `dropped`, `skipped` (frames passed
//!   over by `--max-fps`), `faces`.
//! - `warning`: a recoverable problem — `message`, and `count` (warnings so far).
//! - `summary`: at the end of the run (also after a fatal input error, which then goes to stderr
//!   with exit status 1) — totals (`dropped` for a busy pipeline, `skipped` for `--max-fps`,
//!   `faces_left_out` for faces beyond `--max-faces`),
//!   `source_fps`, `media_s` (media time covered: the last frame's `pts_s` plus one frame) and
//!   latency percentiles.

use std::io::Write;
use std::time::{Instant, SystemTime};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// Schema version of every line.
pub const SCHEMA_VERSION: u32 = 1;

/// Class name → value, serialised as a JSON object in class order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMap {
    pub names: std::sync::Arc<Vec<String>>,
    pub values: Vec<f32>,
}

impl Serialize for ClassMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (k, v) in self.names.iter().zip(&self.values) {
            m.serialize_entry(k, &round(*v as f64, 5))?;
        }
        m.end()
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// One face of a `frame` line.
#[derive(Debug, Clone, Serialize)]
pub struct FaceOut {
    pub id: u64,
    #[serde(rename = "box")]
    pub bbox: [i32; 4],
    pub det_score: f64,
    /// Head roll in degrees, from the eyes BlazeFace found (absent when the face was found by
    /// rustface alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll_deg: Option<f64>,
    pub label: String,
    pub probs: ClassMap,
    pub votes: ClassMap,
    pub certain: bool,
    /// `None` (JSON null) when the t-test is undefined.
    pub p_value: Option<f64>,
    pub entropy: f64,
}

/// Per-frame stage latencies in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub capture_to_emit: f64,
    /// Waiting in the queues before the face stage and before inference.
    pub queue: f64,
    /// Face detection and tracking.
    pub detect: f64,
    /// Cutting and resizing the face crops.
    pub crop: f64,
    /// Encoder and CARD sampler (shared by the faces of a batch).
    pub infer: f64,
    /// From inference to the line being written.
    pub emit: f64,
}

/// What produced a run's output, written on its `start` line.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Provenance {
    /// fer-cam's version.
    pub version: String,
    pub model: crate::infer::ModelOrigin,
    pub classes: Vec<String>,
    /// Test-time views per face (`none`, `flip`, `ten-crop`).
    pub views: crate::config::Tta,
    pub samples: usize,
    pub steps: usize,
    pub seed: u64,
    pub smooth: f32,
    pub detector: DetectorSettings,
}

/// The face stage's settings on the `start` line.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DetectorSettings {
    /// Full-frame search.
    pub full: String,
    /// Search around known faces.
    pub near: String,
    /// Frames are downscaled to this width for the full search (0: never).
    pub detect_width: u32,
    pub detect_every: u32,
    pub min_face: u32,
    pub threshold: f64,
    /// Crop margin around the box (fraction of its side, each side).
    pub margin: f32,
}

/// The body of each message type.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Body {
    Start {
        #[serde(flatten)]
        run: Box<Provenance>,
        source: String,
        source_fps: Option<f64>,
        live: bool,
        stills: bool,
    },
    Frame {
        source: String,
        frame: u64,
        pts_s: Option<f64>,
        size: [u32; 2],
        #[serde(skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        faces: Vec<FaceOut>,
        latency_ms: Latency,
        dropped: u64,
    },
    Status {
        frames: u64,
        fps: f64,
        cpu_percent: f64,
        dropped: u64,
        /// Frames passed over on purpose by `--max-fps`.
        skipped: u64,
        faces: u64,
    },
    Warning {
        message: String,
        count: u64,
    },
    Summary {
        source: String,
        frames: u64,
        faces: u64,
        dropped: u64,
        skipped: u64,
        warnings: u64,
        /// Faces beyond `--max-faces` in their frames, not classified.
        faces_left_out: u64,
        seconds: f64,
        fps: f64,
        source_fps: Option<f64>,
        media_s: Option<f64>,
        latency_ms: Percentiles,
    },
}

impl Latency {
    /// The median of each part over `frames` (each part on its own: the medians need not add
    /// up to the median total).
    pub fn medians(frames: &[Latency]) -> Latency {
        let p50 = |f: fn(&Latency) -> f64| {
            Percentiles::from_samples(&frames.iter().map(f).collect::<Vec<_>>()).p50
        };
        Latency {
            capture_to_emit: p50(|l| l.capture_to_emit),
            queue: p50(|l| l.queue),
            detect: p50(|l| l.detect),
            crop: p50(|l| l.crop),
            infer: p50(|l| l.infer),
            emit: p50(|l| l.emit),
        }
    }
}

/// Latency percentiles of `capture_to_emit`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From samples (any order); zeros when empty.
    pub fn from_samples(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| nearest_rank(&v, q);
        Self {
            p50: round(at(0.50), 2),
            p95: round(at(0.95), 2),
            p99: round(at(0.99), 2),
            max: round(at(1.0), 2),
        }
    }
}

/// The `q` quantile (0..=1) of ascending, non-empty `sorted` by the nearest rank.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    sorted[((q * last as f64).round() as usize).min(last)]
}

#[derive(Serialize)]
struct Line<'a> {
    v: u32,
    ts: String,
    mono_ms: f64,
    #[serde(flatten)]
    body: &'a Body,
}

/// Writes lines to a sink (stdout in the daemon), flushing each one.
pub struct Emitter<W: Write> {
    out: W,
    start: Instant,
}

impl<W: Write> Emitter<W> {
    pub fn new(out: W, start: Instant) -> Self {
        Self { out, start }
    }

    /// Serialises and writes one line. An `Err` with kind `BrokenPipe` means the reader left.
    pub fn emit(&mut self, body: &Body) -> std::io::Result<()> {
        let line = Line {
            v: SCHEMA_VERSION,
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            mono_ms: round(self.start.elapsed().as_secs_f64() * 1e3, 3),
            body,
        };
        let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        self.out.write_all(&text)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn frame_line_has_the_documented_fields() {
        let names = Arc::new(vec!["happy".to_string(), "sad".to_string()]);
        let body = Body::Frame {
            source: "file:x.y4m".into(),
            frame: 3,
            pts_s: Some(0.125),
            size: [320, 180],
            file: None,
            faces: vec![FaceOut {
                id: 1,
                bbox: [10, 20, 30, 30],
                det_score: 4.2,
                roll_deg: None,
                label: "happy".into(),
                probs: ClassMap {
                    names: names.clone(),
                    values: vec![0.9, 0.1],
                },
                votes: ClassMap {
                    names,
                    values: vec![1.0, 0.0],
                },
                certain: true,
                p_value: None,
                entropy: 0.325,
            }],
            latency_ms: Latency::default(),
            dropped: 0,
        };
        let mut buf = Vec::new();
        Emitter::new(&mut buf, Instant::now()).emit(&body).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "frame");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["faces"][0]["box"], serde_json::json!([10, 20, 30, 30]));
        assert_eq!(v["faces"][0]["p_value"], serde_json::Value::Null);
        // Class order is kept (happy before sad).
        let probs = text.find("\"happy\":0.9").unwrap();
        assert!(probs < text.find("\"sad\":0.1").unwrap());
        assert!(v.get("file").is_none());
        assert_eq!(v["pts_s"], 0.125);
    }

    #[test]
    fn start_line_carries_the_provenance_flat() {
        let body = Body::Start {
            run: Box::new(Provenance {
                version: "1.2.3".into(),
                model: crate::infer::ModelOrigin {
                    name: "builtin:fer2013".into(),
                    sha256: "ab".into(),
                },
                classes: vec!["happy".into()],
                views: crate::config::Tta::Flip,
                samples: 32,
                steps: 10,
                seed: 7,
                smooth: 1.0,
                detector: DetectorSettings::default(),
            }),
            source: "stdin".into(),
            source_fps: None,
            live: false,
            stills: true,
        };
        let mut buf = Vec::new();
        Emitter::new(&mut buf, Instant::now()).emit(&body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["type"], "start");
        assert_eq!(v["version"], "1.2.3");
        assert_eq!(v["model"]["name"], "builtin:fer2013");
        assert_eq!(v["views"], "flip");
        assert_eq!(v["source_fps"], serde_json::Value::Null);
        assert_eq!(v["detector"]["full"], "");
        assert_eq!(v["stills"], true);
    }

    #[test]
    fn percentiles() {
        let p = Percentiles::from_samples(&(1..=100).map(|x| x as f64).collect::<Vec<_>>());
        assert_eq!((p.p50, p.p95, p.p99, p.max), (51.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::from_samples(&[]).max, 0.0);
    }
}
