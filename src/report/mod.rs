//! `fer-cam report`: a recorded run (the JSON lines of `fer-cam run`, schema v1) turned into
//! something a person reads — per-track emotion timelines with the uncertain stretches marked,
//! the share of time in each emotion, the certain fraction, detection gaps, and latency
//! percentiles and histogram — as SVG plots on one self-contained HTML page, plus a CSV with one
//! row per face per frame for pandas or a spreadsheet.
//!
//! Reading is forgiving where a recording can be damaged (a line cut short by a crash, a stray
//! log line): such lines are skipped and counted. A line of another schema version is an error,
//! because its fields may mean something else.

mod page;
mod plots;

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

pub use page::write_report;

/// Longest line read; longer ones are skipped as malformed (a guard against unbounded memory).
/// `run` stays far below it: a frame of 64 faces (`--max-faces`' default) of a built-in model
/// is under 50 KB, and 16 MiB holds 64 faces of 1,000 classes with 64-character names.
const MAX_LINE: usize = 16 << 20;

/// One face of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceRec {
    pub track: u64,
    pub bbox: [i64; 4],
    pub det_score: f64,
    pub label: String,
    /// In the class order of [`Recording::classes`].
    pub probs: Vec<f64>,
    pub certain: bool,
    pub p_value: Option<f64>,
    pub entropy: f64,
}

/// One `frame` line.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameRec {
    /// The source's frame number.
    pub frame: u64,
    /// Seconds since the run started (`mono_ms`).
    pub time_s: f64,
    /// Media time (`pts_s`): seconds into the recording; `None` for stills and older files.
    pub pts_s: Option<f64>,
    /// The still's file name, for stills.
    pub file: Option<String>,
    /// Frames dropped so far (a busy pipeline on a live source).
    pub dropped: u64,
    pub faces: Vec<FaceRec>,
    /// capture→emit, detect, infer, queue (ms).
    pub latency_ms: [f64; 4],
}

impl FrameRec {
    /// Media time when the run has it, else run time.
    pub fn when_s(&self) -> f64 {
        self.pts_s.unwrap_or(self.time_s)
    }
}

/// A parsed recording.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub source: Option<String>,
    pub classes: Vec<String>,
    pub frames: Vec<FrameRec>,
    pub warnings: u64,
    /// Lines skipped because they were not valid v1 lines of a known shape.
    pub malformed: u64,
    /// The run's own `summary` line, when it got that far.
    pub summary: Option<Value>,
    /// The run's `start` line: what produced it (version, model, settings, source).
    pub start: Option<Value>,
    /// Runs in the file (more than one when runs were appended to one file): each later run's
    /// track numbers continue after the highest of the runs before it, so no track spans two.
    pub runs: u64,
    /// Added to the track ids of the current run.
    track_offset: u64,
    /// The highest track number so far (after the offset).
    max_track: u64,
}

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k)?.as_f64().filter(|x| x.is_finite())
}

/// Reads one line of at most `MAX_LINE` bytes; `Ok(None)` at the end. A longer line is consumed
/// and returned as `Some(Err(()))`.
fn next_line<R: BufRead>(r: &mut R) -> std::io::Result<Option<std::result::Result<Vec<u8>, ()>>> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE && !line.ends_with(b"\n") {
        // Skip the rest of the over-long line, but not for ever (`/dev/zero` has no newline).
        let mut sink = Vec::new();
        let mut skipped = 0u64;
        loop {
            sink.clear();
            let m = std::io::Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', &mut sink)?;
            skipped += m as u64;
            if m == 0 || sink.ends_with(b"\n") {
                break;
            }
            if skipped > MAX_JUNK_BYTES {
                return Err(std::io::Error::other(format!(
                    "a line longer than {} MiB; is it a run's output?",
                    MAX_JUNK_BYTES >> 20
                )));
            }
        }
        return Ok(Some(Err(())));
    }
    Ok(Some(Ok(line)))
}

/// Bytes of lines that are not fer-cam's read in a row before the input is judged not to be a
/// run's output (`report /dev/zero` would otherwise read for ever).
const MAX_JUNK_BYTES: u64 = 64 << 20;

impl Recording {
    /// Parses a run's JSON lines: plain or gzip-compressed UTF-8 (a byte-order mark is skipped).
    /// UTF-16, input with no fer-cam line, or 64 MiB of other lines in a row is an error.
    pub fn read<R: BufRead>(mut r: R, name: &str) -> Result<Self> {
        let head = r
            .fill_buf()
            .map_err(|e| Error::file(name, e.to_string()))?
            .to_vec();
        if head.starts_with(&[0x1f, 0x8b]) {
            let gz = std::io::BufReader::new(flate2::bufread::MultiGzDecoder::new(r));
            return Self::read_lines(Box::new(gz), name);
        }
        if head.starts_with(&[0xff, 0xfe]) || head.starts_with(&[0xfe, 0xff]) {
            return Err(Error::file(
                name,
                "is UTF-16 text; fer-cam writes (and reads) UTF-8 (convert it: iconv -f UTF-16 \
                 -t UTF-8)",
            ));
        }
        if head.starts_with(&[0xef, 0xbb, 0xbf]) {
            r.consume(3);
        }
        Self::read_lines(Box::new(r), name)
    }

    fn read_lines(mut r: Box<dyn BufRead + '_>, name: &str) -> Result<Self> {
        let mut rec = Recording::default();
        let mut line_no = 0u64;
        let (mut junk, mut valid) = (0u64, 0u64);
        while let Some(line) = next_line(&mut r).map_err(|e| Error::file(name, e.to_string()))? {
            line_no += 1;
            if junk > MAX_JUNK_BYTES {
                return Err(Error::file(
                    name,
                    format!(
                        "{} MiB in a row that are not fer-cam lines (before line {line_no}); is \
                         it a run's output?",
                        junk >> 20
                    ),
                ));
            }
            // An over-long line counts as the bytes read of it.
            let (ok, len) = match line {
                Err(()) => (false, MAX_LINE),
                Ok(line) => match rec.take_line(&line, line_no, name)? {
                    None => continue,
                    Some(ok) => (ok, line.len()),
                },
            };
            if ok {
                (junk, valid) = (0, valid + 1);
            } else {
                rec.malformed += 1;
                junk += len as u64;
            }
        }
        if valid == 0 {
            return Err(Error::file(
                name,
                if rec.malformed == 0 {
                    "is empty: no fer-cam lines to report on".to_string()
                } else {
                    format!(
                        "holds no fer-cam lines ({} malformed); is it a run's output?",
                        rec.malformed
                    )
                },
            ));
        }
        Ok(rec)
    }

    /// Takes one line: `None` for a blank one, `Some(true)` for a fer-cam line of a known type,
    /// `Some(false)` for anything else (malformed). Another schema version is an error, because
    /// its fields may mean something else.
    fn take_line(&mut self, line: &[u8], line_no: u64, name: &str) -> Result<Option<bool>> {
        let text = String::from_utf8_lossy(line);
        if text.trim().is_empty() {
            return Ok(None);
        }
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return Ok(Some(false));
        };
        match v.get("v").and_then(Value::as_u64) {
            Some(1) => {}
            Some(other) => {
                return Err(Error::file(
                    name,
                    format!(
                        "line {line_no}: schema version {other} (this fer-cam reads version 1)"
                    ),
                ))
            }
            None => return Ok(Some(false)),
        }
        Ok(Some(match v.get("type").and_then(Value::as_str) {
            Some("frame") => self.add_frame(&v),
            Some("summary") => {
                self.summary = Some(v);
                true
            }
            Some("start") => {
                self.runs += 1;
                if self.start.is_none() {
                    self.start = Some(v);
                } else {
                    // Another run appended to the file: its tracks are other people.
                    self.track_offset = self.max_track;
                }
                true
            }
            Some("warning") => {
                self.warnings += 1;
                true
            }
            Some("status") => true,
            _ => false,
        }))
    }

    /// Adds a `frame` line; false when it lacks a required field.
    fn add_frame(&mut self, v: &Value) -> bool {
        let parsed = (|| {
            let frame = v.get("frame")?.as_u64()?;
            let time_s = num(v, "mono_ms")? / 1e3;
            let lat = v.get("latency_ms")?;
            let latency_ms = [
                num(lat, "capture_to_emit")?,
                num(lat, "detect")?,
                num(lat, "infer")?,
                num(lat, "queue").unwrap_or(0.0),
            ];
            let mut faces = Vec::new();
            for f in v.get("faces")?.as_array()? {
                faces.push(self.face(f)?);
            }
            if let Some(s) = v.get("source").and_then(Value::as_str) {
                self.source.get_or_insert_with(|| s.to_string());
            }
            Some(FrameRec {
                frame,
                time_s,
                pts_s: num(v, "pts_s"),
                file: v.get("file").and_then(Value::as_str).map(str::to_string),
                dropped: v.get("dropped").and_then(Value::as_u64).unwrap_or(0),
                faces,
                latency_ms,
            })
        })();
        match parsed {
            Some(f) => {
                self.frames.push(f);
                true
            }
            None => false,
        }
    }

    fn face(&mut self, f: &Value) -> Option<FaceRec> {
        let probs = f.get("probs")?.as_object()?;
        if self.classes.is_empty() {
            self.classes = probs.keys().cloned().collect();
        }
        // Every face must carry the same classes as the first one.
        if probs.len() != self.classes.len() {
            return None;
        }
        let values = self
            .classes
            .iter()
            .map(|c| probs.get(c)?.as_f64().filter(|p| p.is_finite()))
            .collect::<Option<Vec<f64>>>()?;
        let b = f.get("box")?.as_array()?;
        if b.len() != 4 {
            return None;
        }
        let mut bbox = [0i64; 4];
        for (o, x) in bbox.iter_mut().zip(b) {
            *o = x.as_i64()?;
        }
        let track = f.get("id")?.as_u64()?.checked_add(self.track_offset)?;
        self.max_track = self.max_track.max(track);
        Some(FaceRec {
            track,
            bbox,
            det_score: num(f, "det_score").unwrap_or(f64::NAN),
            label: f.get("label")?.as_str()?.to_string(),
            probs: values,
            certain: f.get("certain")?.as_bool()?,
            p_value: num(f, "p_value"),
            entropy: num(f, "entropy").unwrap_or(f64::NAN),
        })
    }

    /// Per-track statistics, by track id.
    pub fn tracks(&self) -> BTreeMap<u64, TrackStats> {
        let mut out: BTreeMap<u64, TrackStats> = BTreeMap::new();
        for fr in &self.frames {
            for f in &fr.faces {
                let t = out.entry(f.track).or_insert_with(|| TrackStats {
                    track: f.track,
                    first_frame: fr.frame,
                    last_frame: fr.frame,
                    first_s: fr.when_s(),
                    last_s: fr.when_s(),
                    share: vec![0.0; self.classes.len()],
                    mean_probs: vec![0.0; self.classes.len()],
                    ..Default::default()
                });
                if t.frames > 0 && fr.frame > t.last_frame + 1 {
                    t.gaps += 1;
                    t.gap_frames += fr.frame - t.last_frame - 1;
                }
                t.frames += 1;
                t.last_frame = fr.frame;
                t.last_s = fr.when_s();
                if let Some(i) = self.classes.iter().position(|c| *c == f.label) {
                    t.share[i] += 1.0;
                }
                for (m, p) in t.mean_probs.iter_mut().zip(&f.probs) {
                    *m += p;
                }
                t.certain += f.certain as u64 as f64;
            }
        }
        for t in out.values_mut() {
            let n = t.frames as f64;
            t.share.iter_mut().for_each(|s| *s /= n);
            t.mean_probs.iter_mut().for_each(|s| *s /= n);
            t.certain /= n;
        }
        out
    }

    /// Stretches of consecutive processed frames with no face: (first frame, last frame, count).
    pub fn empty_stretches(&self) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        let mut open = false;
        for f in &self.frames {
            match (f.faces.is_empty(), open, out.last_mut()) {
                (true, true, Some(last)) => {
                    last.1 = f.frame;
                    last.2 += 1;
                }
                (true, _, _) => {
                    out.push((f.frame, f.frame, 1));
                    open = true;
                }
                (false, _, _) => open = false,
            }
        }
        out
    }

    /// Each frame a photo of its own: the run said so, or (a file without a `start` line) every
    /// frame names a file and none has media time.
    pub fn stills(&self) -> bool {
        match self.start.as_ref().and_then(|s| s.get("stills")?.as_bool()) {
            Some(s) => s,
            None => {
                !self.frames.is_empty()
                    && self
                        .frames
                        .iter()
                        .all(|f| f.file.is_some() && f.pts_s.is_none())
            }
        }
    }

    /// Whether the media time of the frames is known.
    pub fn has_media_time(&self) -> bool {
        !self.frames.is_empty() && self.frames.iter().all(|f| f.pts_s.is_some())
    }

    /// Frames the run did not process: (dropped because busy, skipped by `--max-fps`), from its
    /// summary, or the last frame's count when it has none.
    pub fn unprocessed(&self) -> (u64, u64) {
        let from = |k: &str| self.summary.as_ref()?.get(k)?.as_u64();
        (
            from("dropped").unwrap_or_else(|| self.frames.last().map_or(0, |f| f.dropped)),
            from("skipped").unwrap_or(0),
        )
    }

    /// The run read its source live (stale frames dropped when busy); unknown: false.
    pub fn live(&self) -> bool {
        self.start
            .as_ref()
            .and_then(|s| s.get("live")?.as_bool())
            .unwrap_or(false)
    }

    /// Percentiles of capture→emit, detect, infer and queue latency.
    pub fn latency(&self) -> [LatencyStats; 4] {
        [0, 1, 2, 3].map(|k| {
            let v: Vec<f64> = self.frames.iter().map(|f| f.latency_ms[k]).collect();
            LatencyStats::of(&v)
        })
    }
}

/// What one track did over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrackStats {
    pub track: u64,
    pub frames: u64,
    pub first_frame: u64,
    pub last_frame: u64,
    pub first_s: f64,
    pub last_s: f64,
    /// Fraction of the track's frames with each label (class order).
    pub share: Vec<f64>,
    pub mean_probs: Vec<f64>,
    /// Fraction of the track's frames whose label was certain.
    pub certain: f64,
    /// Times the track was missing for a frame or more, and the frames missed.
    pub gaps: u64,
    pub gap_frames: u64,
}

/// Latency percentiles in ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencyStats {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencyStats {
    fn of(v: &[f64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| crate::emit::nearest_rank(&s, q);
        Self {
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn frame_line(frame: u64, faces: &[(u64, &str, bool)]) -> String {
        let faces: Vec<Value> = faces
            .iter()
            .map(|(id, label, certain)| {
                let happy = if *label == "happy" { 0.8 } else { 0.2 };
                serde_json::json!({"id": id, "box": [10, 20, 30, 30], "det_score": 5.0,
                    "label": label, "probs": {"happy": happy, "sad": 1.0 - happy},
                    "votes": {"happy": 1.0, "sad": 0.0}, "certain": certain,
                    "p_value": null, "entropy": 0.5})
            })
            .collect();
        serde_json::json!({"v": 1, "ts": "2026-01-01T00:00:00.000Z", "mono_ms": frame as f64 * 100.0,
            "type": "frame", "source": "file:x.y4m", "frame": frame, "size": [64, 48],
            "faces": faces, "latency_ms": {"capture_to_emit": frame as f64, "detect": 1.0, "infer": 2.0},
            "dropped": 0})
        .to_string()
    }

    #[test]
    fn tracks_shares_gaps_and_malformed_lines() {
        let lines = [
            frame_line(0, &[(1, "happy", true)]),
            "{\"v\":1,\"type\":\"frame\",\"frame\":1".to_string(), // cut short
            "not json".to_string(),
            frame_line(1, &[(1, "sad", false), (2, "happy", true)]),
            frame_line(2, &[]),
            frame_line(3, &[]),
            frame_line(4, &[(1, "happy", true)]),
            "{\"v\":1,\"type\":\"warning\",\"message\":\"x\",\"count\":1}".to_string(),
        ];
        let rec = Recording::read(lines.join("\n").as_bytes(), "run.jsonl").unwrap();
        assert_eq!((rec.frames.len(), rec.malformed, rec.warnings), (5, 2, 1));
        assert_eq!(rec.classes, vec!["happy", "sad"]);
        let t = rec.tracks();
        let one = &t[&1];
        assert_eq!((one.frames, one.gaps, one.gap_frames), (3, 1, 2));
        assert!(
            (one.share[0] - 2.0 / 3.0).abs() < 1e-12 && (one.certain - 2.0 / 3.0).abs() < 1e-12
        );
        assert_eq!(t[&2].frames, 1);
        assert_eq!(rec.empty_stretches(), vec![(2, 3, 2)]);
        let lat = rec.latency();
        assert_eq!((lat[0].p50, lat[0].max, lat[2].mean), (2.0, 4.0, 2.0));
    }

    #[test]
    fn runs_appended_to_one_file_do_not_share_tracks() {
        let start = "{\"v\":1,\"type\":\"start\",\"stills\":false}".to_string();
        let lines = [
            start.clone(),
            frame_line(0, &[(1, "happy", true), (2, "sad", true)]),
            start,
            frame_line(0, &[(1, "sad", true)]),
            frame_line(1, &[(1, "sad", true)]),
        ];
        let rec = Recording::read(lines.join("\n").as_bytes(), "r").unwrap();
        assert_eq!(rec.runs, 2);
        let t = rec.tracks();
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!((t[&1].frames, t[&3].frames), (1, 2));
    }

    #[test]
    fn another_schema_version_is_an_error() {
        let e = Recording::read(&b"{\"v\":2,\"type\":\"frame\"}\n"[..], "r.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("schema version 2") && e.lines().count() == 1,
            "{e}"
        );
    }

    #[test]
    fn gzip_boms_utf16_and_inputs_without_a_run_line() {
        use std::io::Write;
        let run = frame_line(0, &[(1, "happy", true)]) + "\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(run.as_bytes()).unwrap();
        let rec = Recording::read(&gz.finish().unwrap()[..], "r.jsonl.gz").unwrap();
        assert_eq!(rec.frames.len(), 1);
        let bom = [&[0xef, 0xbb, 0xbf][..], run.as_bytes()].concat();
        let rec = Recording::read(&bom[..], "r").unwrap();
        assert_eq!((rec.frames.len(), rec.malformed), (1, 0));
        let utf16: Vec<u8> = [0xff, 0xfe]
            .into_iter()
            .chain(run.encode_utf16().flat_map(|u| u.to_le_bytes()))
            .collect();
        let e = Recording::read(&utf16[..], "r").unwrap_err().to_string();
        assert!(e.contains("UTF-16"), "{e}");
        for (input, want) in [(&b""[..], "is empty"), (&b"a\nb\n"[..], "no fer-cam lines")] {
            let e = Recording::read(input, "r").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // An endless stream with no newline (`report /dev/zero`) ends with an error.
        let zero =
            std::io::BufReader::new(std::io::Read::take(std::io::repeat(0), MAX_JUNK_BYTES * 2));
        let e = Recording::read(zero, "/dev/zero").unwrap_err().to_string();
        assert!(e.contains("MiB"), "{e}");
    }

    #[test]
    fn an_endless_line_is_skipped_not_buffered() {
        let mut data = vec![b'x'; MAX_LINE * 3];
        data.push(b'\n');
        data.extend_from_slice(frame_line(0, &[(1, "happy", true)]).as_bytes());
        let rec = Recording::read(&data[..], "r").unwrap();
        assert_eq!((rec.malformed, rec.frames.len()), (1, 1));
    }
}
