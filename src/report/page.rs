//! Writes a report directory: `index.html` (self-contained: plots inlined), the same plots as
//! `.svg` files, `faces.csv` (one row per face per frame) and `summary.json`. The directory is
//! written whole ([`crate::fsutil::write_dir_atomically`]): a failed write leaves nothing.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::plots::{self, track_series};
use super::{Recording, TrackStats};
use crate::error::{Error, Result};

/// Tracks that get their own timeline (the longest ones); every track is in the CSV and tables.
const MAX_TIMELINES: usize = 50;
/// Tracks shown in the share chart.
const MAX_SHARE_ROWS: usize = 30;

/// Creates `dir` (new or empty) and writes the report into it. Returns the files written.
pub fn write_report(rec: &Recording, input: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_none();
        if !empty {
            return Err(Error::file(
                dir,
                "exists and is not empty (report writes into a new or empty directory)",
            ));
        }
    }
    // Everything is built in memory and the directory appears whole (a full disk leaves no
    // half report in the way of the retry).
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        files.push((name.to_string(), bytes.to_vec()));
        Ok(())
    };

    let tracks = rec.tracks();
    let mut by_size: Vec<&TrackStats> = tracks.values().collect();
    by_size.sort_by(|a, b| b.frames.cmp(&a.frames).then(a.track.cmp(&b.track)));
    let lat = rec.latency();
    let c2e: Vec<f64> = rec.frames.iter().map(|f| f.latency_ms[0]).collect();
    let stills = rec.stills();

    let share_svg = plots::responsive(plots::shares(
        &by_size[..by_size.len().min(MAX_SHARE_ROWS)],
        &rec.classes,
    )?);
    let latency_svg = plots::responsive(plots::latency(&c2e, lat[0].p50, lat[0].p95)?);
    let mut timelines = Vec::new();
    if !stills {
        let media = rec.has_media_time();
        let (x, x_desc): (fn(&super::FrameRec) -> f64, &str) = if media {
            (|f| f.pts_s.unwrap_or(0.0), "media time (s)")
        } else {
            (|f| f.frame as f64, "frame")
        };
        for t in by_size.iter().take(MAX_TIMELINES) {
            let series = track_series(&rec.frames, t.track, x);
            let svg = plots::responsive(plots::timeline(t.track, &series, &rec.classes, x_desc)?);
            timelines.push((t.track, svg));
        }
    }

    put("faces.csv", &faces_csv(rec)?)?;
    if !stills {
        put("emotion-share.svg", share_svg.as_bytes())?;
    }
    put("latency.svg", latency_svg.as_bytes())?;
    for (id, svg) in &timelines {
        put(&format!("timeline-track-{id}.svg"), svg.as_bytes())?;
    }
    let empty = rec.empty_stretches();
    let (dropped, skipped) = rec.unprocessed();
    let summary = json!({
        "input": input,
        "source": rec.source,
        "produced_by": rec.start,
        "stills": stills,
        "media_time": rec.has_media_time(),
        "dropped": dropped,
        "skipped": skipped,
        "classes": rec.classes,
        "frames": rec.frames.len(),
        "faces": rec.frames.iter().map(|f| f.faces.len()).sum::<usize>(),
        "malformed_lines": rec.malformed,
        "warnings": rec.warnings,
        "tracks": by_size,
        "frames_without_face": empty.iter().map(|s| s.2).sum::<u64>(),
        "stretches_without_face": empty.iter().map(|s| json!({"first_frame": s.0, "last_frame": s.1, "frames": s.2})).collect::<Vec<_>>(),
        "latency_ms": {"capture_to_emit": lat[0], "detect": lat[1], "infer": lat[2], "queue": lat[3]},
        "run_summary": rec.summary,
    });
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Msg(e.to_string()))?;
    put("summary.json", text.as_bytes())?;
    let html = page(rec, input, &by_size, &share_svg, &latency_svg, &timelines);
    put("index.html", html.as_bytes())?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    crate::fsutil::write_dir_atomically(dir, |tmp| {
        for (name, bytes) in &files {
            let p = tmp.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| Error::file(dir.join(name), e.to_string()))?;
            f.write_all(bytes)
                .map_err(|e| Error::file(dir.join(name), e.to_string()))?;
        }
        Ok(())
    })?;
    Ok(files.iter().map(|(name, _)| dir.join(name)).collect())
}

/// A text cell a spreadsheet will not run as a formula: one that starts with `=`, `+`, `-`, `@`,
/// a tab or a carriage return gets a leading `'` (OWASP's advice on CSV injection).
fn csv_text(cell: &str) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{cell}")
    } else {
        cell.to_string()
    }
}

/// One row per face per frame: `time_s` is media time (seconds into the recording; empty for
/// stills), `run_s` the run's own clock. Numbers are written as numbers; the file names, labels
/// and class names, which come from the input, go through [`csv_text`].
fn faces_csv(rec: &Recording) -> Result<Vec<u8>> {
    let fail = |e: csv::Error| Error::Msg(format!("writing faces.csv: {e}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = [
        "frame",
        "file",
        "time_s",
        "run_s",
        "track",
        "x",
        "y",
        "w",
        "h",
        "det_score",
        "label",
        "certain",
        "p_value",
        "entropy",
    ]
    .map(String::from)
    .to_vec();
    header.extend(rec.classes.iter().map(|c| csv_text(&format!("p_{c}"))));
    w.write_record(&header).map_err(fail)?;
    for fr in &rec.frames {
        for f in &fr.faces {
            let mut row = vec![
                fr.frame.to_string(),
                csv_text(fr.file.as_deref().unwrap_or("")),
                fr.pts_s.map(|t| format!("{t:.3}")).unwrap_or_default(),
                format!("{:.3}", fr.time_s),
                f.track.to_string(),
            ];
            row.extend(f.bbox.iter().map(|v| v.to_string()));
            row.push(opt(Some(f.det_score)));
            row.push(csv_text(&f.label));
            row.push(f.certain.to_string());
            row.push(opt(f.p_value));
            row.push(opt(Some(f.entropy)));
            row.extend(f.probs.iter().map(|p| p.to_string()));
            w.write_record(&row).map_err(fail)?;
        }
    }
    w.into_inner()
        .map_err(|e| Error::Msg(format!("writing faces.csv: {e}")))
}

/// A number for the CSV; empty when missing or not finite.
fn opt(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| x.to_string())
        .unwrap_or_default()
}

fn esc(s: &str) -> String {
    super::plots::printable(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

/// "1 track", "2 tracks", "2 stretches".
fn count(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        _ if what.ends_with("ch") => format!("{n} {what}es"),
        _ => format!("{n} {what}s"),
    }
}

const STYLE: &str =
    "body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em;max-width:960px;\
    line-height:1.45;color:#222}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em}\
    svg{width:100%;height:auto;display:block;margin:.5em 0}\
    .scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}\
    table{border-collapse:collapse;margin:.5em 0;font-size:.95em}\
    td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}\
    th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
    .note{color:#555}.warn{background:#fff4e0;border-left:4px solid #d55e00;padding:.5em .8em}\
    code{font-size:.95em}dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}\
    dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}";

fn page(
    rec: &Recording,
    input: &str,
    tracks: &[&TrackStats],
    share_svg: &str,
    latency_svg: &str,
    timelines: &[(u64, String)],
) -> String {
    let mut h = String::new();
    let faces: usize = rec.frames.iter().map(|f| f.faces.len()).sum();
    let stills = rec.stills();
    let title = esc(rec.source.as_deref().unwrap_or(input));
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>fer-cam report: {title}</title><style>{STYLE}</style></head><body>\
         <h1>fer-cam report</h1><p><b>{title}</b> — "
    );
    if stills {
        let _ = write!(
            h,
            "{}, {}",
            count(rec.frames.len(), "photo"),
            count(faces, "face")
        );
    } else {
        let _ = write!(
            h,
            "{}, {}, {}",
            count(rec.frames.len(), "frame"),
            count(faces, "face"),
            count(tracks.len(), "track")
        );
        let fps = rec
            .start
            .as_ref()
            .and_then(|s| s.get("source_fps")?.as_f64());
        match (rec.frames.first(), rec.frames.last(), rec.has_media_time()) {
            (Some(a), Some(b), true) => {
                let step = fps.map_or(0.0, |f| 1.0 / f);
                let _ = write!(
                    h,
                    ", {:.1} s of video ({:.1}–{:.1} s{})",
                    b.pts_s.unwrap_or(0.0) - a.pts_s.unwrap_or(0.0) + step,
                    a.pts_s.unwrap_or(0.0),
                    b.pts_s.unwrap_or(0.0) + step,
                    fps.map(|f| format!(" at {f:.2} fps")).unwrap_or_default()
                );
            }
            (Some(a), Some(b), false) => {
                let _ = write!(
                    h,
                    ", {:.1} s of run time (this file has no media time)",
                    b.time_s - a.time_s
                );
            }
            _ => {}
        }
    }
    let _ = write!(
        h,
        "; {} skipped, {}.</p>",
        count(rec.malformed as usize, "malformed line"),
        count(rec.warnings as usize, "warning")
    );
    if rec.runs > 1 {
        let _ = write!(
            h,
            "<p class=\"warn\">This file holds {} runs appended one after another; each later \
             run's track numbers continue after the run before it, and “Produced by” describes \
             the first.</p>",
            rec.runs
        );
    }
    let (dropped, skipped) = rec.unprocessed();
    if dropped + skipped > 0 {
        let seen = rec.frames.len() as u64 + dropped + skipped;
        let _ = write!(
            h,
            "<p class=\"warn\"><b>{} of {seen} frames were not processed</b>: {dropped} dropped \
             (by a busy pipeline, as a live source keeps only the newest frames, or still \
             queued when the run stopped), {skipped} skipped by <code>--max-fps</code>. \
             Timelines and shares describe the processed frames only.</p>",
            dropped + skipped
        );
    }
    provenance(&mut h, rec);
    if stills {
        photos(&mut h, rec);
    } else {
        video_sections(&mut h, rec, tracks, share_svg, timelines);
    }
    latency_section(&mut h, rec, latency_svg);
    let _ = writeln!(
        h,
        "<p class=\"note\">Files: faces.csv (one row per face per frame: <code>time_s</code> is \
         media time, <code>run_s</code> the run's clock), summary.json, and each plot as SVG. \
         “Certain” means CARD's samples separate the top two emotions by a paired t-test; it \
         is the model's confidence, not proof of what a person feels.</p></body></html>"
    );
    h
}

/// What produced the recording (its `start` line).
fn provenance(h: &mut String, rec: &Recording) {
    h.push_str("<h2>Produced by</h2>");
    let Some(s) = &rec.start else {
        h.push_str(
            "<p class=\"note\">Not recorded: this file has no <code>start</code> line (written \
             by fer-cam before version 0.1.0's provenance, or cut at its head).</p>",
        );
        return;
    };
    let text = |v: Option<&serde_json::Value>| -> String {
        match v {
            Some(serde_json::Value::String(s)) => esc(s),
            Some(serde_json::Value::Null) | None => "—".into(),
            Some(other) => esc(&other.to_string()),
        }
    };
    let d = s.get("detector");
    let sha = s
        .get("model")
        .and_then(|m| m.get("sha256"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let rows = [
        ("fer-cam", text(s.get("version"))),
        (
            "model",
            format!(
                "{} <code title=\"sha256 of the weights\">{}</code>",
                text(s.get("model").and_then(|m| m.get("name"))),
                esc(&sha.chars().take(16).collect::<String>())
            ),
        ),
        ("classes", text(s.get("classes"))),
        (
            "sampler",
            format!(
                "{} samples, {} steps, seed {}, views {}",
                text(s.get("samples")),
                text(s.get("steps")),
                text(s.get("seed")),
                text(s.get("views"))
            ),
        ),
        (
            "detector",
            format!(
                "{} (full frame), {} (near tracks), detect width {}, every {} frames, \
                 min face {}, threshold {}, margin {}",
                text(d.and_then(|d| d.get("full"))),
                text(d.and_then(|d| d.get("near"))),
                text(d.and_then(|d| d.get("detect_width"))),
                text(d.and_then(|d| d.get("detect_every"))),
                text(d.and_then(|d| d.get("min_face"))),
                text(d.and_then(|d| d.get("threshold"))),
                text(d.and_then(|d| d.get("margin")))
            ),
        ),
        (
            "source",
            format!(
                "{} ({})",
                text(s.get("source")),
                if rec.stills() {
                    "stills, each judged on its own".to_string()
                } else {
                    format!(
                        "{} fps, {}",
                        text(s.get("source_fps")),
                        if rec.live() {
                            "live: stale frames dropped when busy"
                        } else {
                            "every frame read"
                        }
                    )
                }
            ),
        ),
        ("smoothing", text(s.get("smooth"))),
    ];
    h.push_str("<dl>");
    for (k, v) in rows {
        let _ = write!(h, "<dt>{k}</dt><dd>{v}</dd>");
    }
    h.push_str("</dl>");
}

/// Stills: one row per photo with its faces' labels.
fn photos(h: &mut String, rec: &Recording) {
    h.push_str(
        "<h2>Photos</h2><p class=\"note\">Each photo is judged on its own (face numbers do \
         not carry from one photo to another).</p><div class=\"scroll\"><table><tr><th>photo\
         </th><th>faces</th><th>emotions (probability; * = certain)</th></tr>",
    );
    for f in &rec.frames {
        let labels: Vec<String> = f
            .faces
            .iter()
            .map(|x| {
                let p = rec
                    .classes
                    .iter()
                    .position(|c| *c == x.label)
                    .and_then(|i| x.probs.get(i))
                    .copied()
                    .unwrap_or(f64::NAN);
                format!(
                    "#{} {} {:.2}{}",
                    x.track,
                    esc(&x.label),
                    p,
                    if x.certain { "*" } else { "" }
                )
            })
            .collect();
        let name = f
            .file
            .as_deref()
            .map(|p| p.rsplit('/').next().unwrap_or(p))
            .unwrap_or("");
        let _ = write!(
            h,
            "<tr><td title=\"{}\">{}</td><td>{}</td><td style=\"text-align:left;white-space:normal\">{}</td></tr>",
            esc(f.file.as_deref().unwrap_or("")),
            esc(name),
            f.faces.len(),
            if labels.is_empty() {
                "no face found".to_string()
            } else {
                labels.join(", ")
            }
        );
    }
    h.push_str("</table></div>");
}

/// Video: tracks, shares, timelines and detection gaps.
fn video_sections(
    h: &mut String,
    rec: &Recording,
    tracks: &[&TrackStats],
    share_svg: &str,
    timelines: &[(u64, String)],
) {
    let media = rec.has_media_time();
    let _ =
        write!(
        h,
        "<h2>Tracks</h2><div class=\"scroll\"><table><tr><th>track</th><th>frames</th><th>{}</th>\
         <th>top emotion</th><th>certain</th><th>gaps (frames missed)</th>",
        if media { "from–to (s)" } else { "first–last frame" }
    );
    for c in &rec.classes {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>");
    for t in tracks {
        let top = t
            .share
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| rec.classes[i].as_str())
            .unwrap_or("");
        let span = if media {
            format!("{:.2}–{:.2}", t.first_s, t.last_s)
        } else {
            format!("{}–{}", t.first_frame, t.last_frame)
        };
        let _ = write!(
            h,
            "<tr><td>#{}</td><td>{}</td><td>{span}</td><td>{}</td><td>{}</td><td>{} ({})</td>",
            t.track,
            t.frames,
            esc(top),
            pct(t.certain),
            t.gaps,
            t.gap_frames
        );
        for s in &t.share {
            let _ = write!(h, "<td>{}</td>", pct(*s));
        }
        h.push_str("</tr>");
    }
    h.push_str("</table></div>");
    let _ = write!(h, "<h2>Share of time in each emotion</h2>{share_svg}");
    h.push_str(
        "<h2>Timelines</h2><p class=\"note\">Mean CARD probabilities per frame, one line per \
         emotion; light grey bands: the t-test could not call the label certain.</p>",
    );
    for (_, svg) in timelines {
        h.push_str(svg);
    }
    if tracks.len() > timelines.len() {
        let _ = write!(
            h,
            "<p class=\"note\">{} shorter tracks have no timeline here (all are in faces.csv).</p>",
            tracks.len() - timelines.len()
        );
    }
    let empty = rec.empty_stretches();
    let at = |frame: u64| -> String {
        let pts = rec
            .frames
            .iter()
            .find(|f| f.frame == frame)
            .and_then(|f| f.pts_s);
        match pts {
            Some(t) => format!("{t:.1} s"),
            None => format!("frame {frame}"),
        }
    };
    let _ = write!(
        h,
        "<h2>Detection gaps</h2><p>{} processed frames had no face, in {}",
        empty.iter().map(|s| s.2).sum::<u64>(),
        count(empty.len(), "stretch")
    );
    let mut longest = empty.clone();
    longest.sort_by_key(|s| std::cmp::Reverse(s.2));
    if !longest.is_empty() {
        h.push_str(" (longest: ");
        let parts: Vec<String> = longest
            .iter()
            .take(5)
            .map(|s| format!("{}–{} ({} frames)", at(s.0), at(s.1), s.2))
            .collect();
        h.push_str(&parts.join(", "));
        h.push(')');
    }
    h.push_str(".</p>");
}

/// Latency table, histogram and what the numbers mean for this kind of run.
fn latency_section(h: &mut String, rec: &Recording, latency_svg: &str) {
    let lat = rec.latency();
    h.push_str(
        "<h2>Latency</h2><div class=\"scroll\"><table><tr><th>part (ms)</th><th>p50</th>\
         <th>p95</th><th>p99</th><th>max</th><th>mean</th></tr>",
    );
    for (name, l) in ["capture → emit", "queue", "detect", "infer"]
        .iter()
        .zip([lat[0], lat[3], lat[1], lat[2]])
    {
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            l.p50, l.p95, l.p99, l.max, l.mean
        );
    }
    h.push_str("</table></div>");
    h.push_str(latency_svg);
    let _ = write!(
        h,
        "<p class=\"note\">{}</p>",
        if rec.live() {
            format!(
                "A live source: capture → emit is the delay from a frame's arrival to its \
                 line (median {:.1} ms, {:.1} ms of it waiting in a queue).",
                lat[0].p50, lat[3].p50
            )
        } else {
            format!(
                "This run read its input as fast as it could (a file, or a stream without \
                 <code>--live</code>), so each frame waited in the queue while the frames \
                 before it were processed: capture → emit (median {:.1} ms) includes {:.1} ms \
                 of queueing and measures throughput, not the delay a person in front of a \
                 camera would see. That delay is about detect + infer ({:.1} ms here); a \
                 camera, <code>--live</code> or <code>--realtime</code> run measures it.",
                lat[0].p50,
                lat[3].p50,
                lat[1].p50 + lat[2].p50
            )
        }
    );
}

#[cfg(test)]
mod tests {
    use super::super::tests::frame_line;
    use super::*;

    #[test]
    fn writes_every_file_and_never_into_a_full_directory() {
        let lines = [
            frame_line(0, &[(1, "happy", true)]),
            frame_line(1, &[(1, "sad", false), (2, "hap<py", true)]),
            "garbage".to_string(),
        ]
        .join("\n");
        let rec = Recording::read(lines.as_bytes(), "run.jsonl").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("rep");
        let files = write_report(&rec, "run.jsonl", &dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        for want in [
            "index.html",
            "faces.csv",
            "summary.json",
            "latency.svg",
            "emotion-share.svg",
            "timeline-track-1.svg",
            "timeline-track-2.svg",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        let csv = std::fs::read_to_string(dir.join("faces.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + 3);
        assert!(csv.starts_with(
            "frame,file,time_s,run_s,track,x,y,w,h,det_score,label,certain,p_value,entropy,\
             p_happy,p_sad"
        ));
        let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
        assert!(html.contains("<svg") && html.contains("1 malformed line skipped"));
        assert!(html.contains("2 tracks") && html.contains("Not recorded"));
        assert!(html.contains("in 0 stretches"), "{html}");
        assert_eq!(esc("a<b&\"c>"), "a&lt;b&amp;&quot;c&gt;");
        for (cell, want) in [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("-1", "'-1"),
            ("\tx", "'\tx"),
            ("happy", "happy"),
        ] {
            assert_eq!(csv_text(cell), want);
        }
        // For a phone: a viewport, plots that scale to the width, tables that scroll inside
        // their own box.
        assert!(html.contains("name=\"viewport\" content=\"width=device-width"));
        assert!(html.contains("svg{width:100%;height:auto"));
        assert!(html.contains(".scroll{overflow-x:auto"));
        let tables = html.matches("<table>").count();
        assert_eq!(
            html.matches("<div class=\"scroll\"><table>").count(),
            tables,
            "every table scrolls in its own box"
        );
        for svg in html.match_indices("<svg").map(|(i, _)| &html[i..]) {
            let head = &svg[..svg.find('>').unwrap()];
            assert!(
                head.contains("width=\"100%\"") && head.contains("viewBox"),
                "{head}"
            );
        }
        // A second report into the same directory is refused and changes nothing.
        assert!(write_report(&rec, "run.jsonl", &dir).is_err());
        assert_eq!(std::fs::read_to_string(dir.join("faces.csv")).unwrap(), csv);
    }

    /// A run's lines with a start line, media time and drops, or stills.
    fn run_lines(stills: bool) -> String {
        let start = serde_json::json!({"v": 1, "ts": "x", "mono_ms": 0.0, "type": "start",
            "version": "9.9.9", "model": {"name": "builtin:fer2013", "sha256": "abcdef0123456789ff"},
            "classes": ["happy", "sad"], "views": "flip", "samples": 32, "steps": 10, "seed": 0,
            "smooth": 1.0, "detector": {"full": "rustface", "near": "blazeface"},
            "source": "file:talk.mp4", "source_fps": if stills { serde_json::Value::Null } else { 25.0.into() },
            "live": !stills, "stills": stills});
        let mut lines = vec![start.to_string()];
        for i in 0..3u64 {
            let mut v: serde_json::Value =
                serde_json::from_str(&frame_line(i, &[(i + 1, "happy", i != 1)])).unwrap();
            if stills {
                v["file"] = format!("photos/p{i}.jpg").into();
            } else {
                v["pts_s"] = (i as f64 / 25.0).into();
                v["dropped"] = 2.into();
            }
            lines.push(v.to_string());
        }
        lines.join("\n")
    }

    #[test]
    fn video_uses_media_time_and_shows_drops_and_provenance() {
        let rec = Recording::read(run_lines(false).as_bytes(), "run.jsonl").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        write_report(&rec, "run.jsonl", &tmp.path().join("r")).unwrap();
        let html = std::fs::read_to_string(tmp.path().join("r/index.html")).unwrap();
        assert!(
            html.contains("s of video") && html.contains("at 25.00 fps"),
            "{html}"
        );
        assert!(html.contains("media time (s)"));
        assert!(html.contains("2 of 5 frames were not processed"), "{html}");
        assert!(html.contains("9.9.9") && html.contains("builtin:fer2013"));
        assert!(html.contains("abcdef0123456789") && !html.contains("abcdef0123456789ff"));
        assert!(html.contains("A live source"));
        let csv = std::fs::read_to_string(tmp.path().join("r/faces.csv")).unwrap();
        assert_eq!(csv.lines().nth(2).unwrap().split(',').nth(2), Some("0.040"));
    }

    #[test]
    fn stills_get_one_row_per_photo_and_no_timelines() {
        let rec = Recording::read(run_lines(true).as_bytes(), "run.jsonl").unwrap();
        assert!(rec.stills());
        let tmp = tempfile::tempdir().unwrap();
        let files = write_report(&rec, "run.jsonl", &tmp.path().join("r")).unwrap();
        assert!(!files
            .iter()
            .any(|f| f.to_string_lossy().contains("timeline")));
        let html = std::fs::read_to_string(tmp.path().join("r/index.html")).unwrap();
        assert!(html.contains("3 photos") && html.contains("<h2>Photos</h2>"));
        assert!(
            html.contains(">p1.jpg<") && html.contains("#2 happy 0.80<"),
            "{html}"
        );
        assert!(!html.contains("Timelines") && !html.contains("were not processed"));
        let csv = std::fs::read_to_string(tmp.path().join("r/faces.csv")).unwrap();
        let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
        assert_eq!((row[1], row[2]), ("photos/p0.jpg", ""));
    }
}
