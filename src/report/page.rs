//! Writes a report directory: `index.html` (self-contained: plots inlined), the same plots as
//! `.svg` files, `faces.csv` (one row per face per frame) and `summary.json`.

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
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&p, e))?;
        written.push(p);
        Ok(())
    };

    let tracks = rec.tracks();
    let mut by_size: Vec<&TrackStats> = tracks.values().collect();
    by_size.sort_by(|a, b| b.frames.cmp(&a.frames).then(a.track.cmp(&b.track)));
    let lat = rec.latency();
    let c2e: Vec<f64> = rec.frames.iter().map(|f| f.latency_ms[0]).collect();

    let share_svg = plots::shares(&by_size[..by_size.len().min(MAX_SHARE_ROWS)], &rec.classes)?;
    let latency_svg = plots::latency(&c2e, lat[0].p50, lat[0].p95)?;
    let mut timelines = Vec::new();
    for t in by_size.iter().take(MAX_TIMELINES) {
        let svg = plots::timeline(t.track, &track_series(&rec.frames, t.track), &rec.classes)?;
        timelines.push((t.track, svg));
    }

    put("faces.csv", &faces_csv(rec)?)?;
    put("emotion-share.svg", share_svg.as_bytes())?;
    put("latency.svg", latency_svg.as_bytes())?;
    for (id, svg) in &timelines {
        put(&format!("timeline-track-{id}.svg"), svg.as_bytes())?;
    }
    let empty = rec.empty_stretches();
    let summary = json!({
        "input": input,
        "source": rec.source,
        "classes": rec.classes,
        "frames": rec.frames.len(),
        "faces": rec.frames.iter().map(|f| f.faces.len()).sum::<usize>(),
        "malformed_lines": rec.malformed,
        "warnings": rec.warnings,
        "tracks": by_size,
        "frames_without_face": empty.iter().map(|s| s.2).sum::<u64>(),
        "stretches_without_face": empty.iter().map(|s| json!({"first_frame": s.0, "last_frame": s.1, "frames": s.2})).collect::<Vec<_>>(),
        "latency_ms": {"capture_to_emit": lat[0], "detect": lat[1], "infer": lat[2]},
        "run_summary": rec.summary,
    });
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Msg(e.to_string()))?;
    put("summary.json", text.as_bytes())?;
    let html = page(rec, input, &by_size, &share_svg, &latency_svg, &timelines);
    put("index.html", html.as_bytes())?;
    Ok(written)
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

/// One row per face per frame. Numbers are written as numbers; the labels and class names, which
/// come from the input, go through [`csv_text`].
fn faces_csv(rec: &Recording) -> Result<Vec<u8>> {
    let fail = |e: csv::Error| Error::Msg(format!("writing faces.csv: {e}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = [
        "frame",
        "time_s",
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
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

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
    let span = match (rec.frames.first(), rec.frames.last()) {
        (Some(a), Some(b)) => b.time_s - a.time_s,
        _ => 0.0,
    };
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>fer-cam report: {title}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:800px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}.note{{color:#666}}</style>\
         </head><body><h1>fer-cam report</h1>\
         <p><b>{title}</b> — {frames} frames, {faces} faces, {ntracks} tracks, {span:.1} s of run time; \
         {malformed} malformed lines skipped, {warnings} warnings.</p>",
        title = esc(rec.source.as_deref().unwrap_or(input)),
        frames = rec.frames.len(),
        ntracks = tracks.len(),
        malformed = rec.malformed,
        warnings = rec.warnings,
    );
    h.push_str("<h2>Tracks</h2><table><tr><th>track</th><th>frames</th><th>first–last frame</th><th>top emotion</th><th>certain</th><th>gaps (frames missed)</th>");
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
        let _ = write!(
            h,
            "<tr><td>#{}</td><td>{}</td><td>{}–{}</td><td>{}</td><td>{}</td><td>{} ({})</td>",
            t.track,
            t.frames,
            t.first_frame,
            t.last_frame,
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
    h.push_str("</table>");
    let _ = write!(h, "<h2>Share of time in each emotion</h2>{share_svg}");
    h.push_str("<h2>Timelines</h2><p class=\"note\">Mean CARD probabilities per frame; grey bands: the t-test could not call the label certain.</p>");
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
    let _ = write!(
        h,
        "<h2>Detection gaps</h2><p>{} processed frames had no face, in {} stretches",
        empty.iter().map(|s| s.2).sum::<u64>(),
        empty.len()
    );
    let mut longest = empty.clone();
    longest.sort_by_key(|s| std::cmp::Reverse(s.2));
    if !longest.is_empty() {
        h.push_str(" (longest: ");
        let parts: Vec<String> = longest
            .iter()
            .take(5)
            .map(|s| format!("frames {}–{}", s.0, s.1))
            .collect();
        h.push_str(&parts.join(", "));
        h.push(')');
    }
    h.push_str(".</p><h2>Latency</h2><table><tr><th>stage (ms)</th><th>p50</th><th>p95</th><th>p99</th><th>max</th><th>mean</th></tr>");
    for (name, l) in ["capture → emit", "detect", "infer"]
        .iter()
        .zip(rec.latency())
    {
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            l.p50, l.p95, l.p99, l.max, l.mean
        );
    }
    let _ = writeln!(
        h,
        "</table>{latency_svg}<p class=\"note\">Files: faces.csv (one row per face per frame), \
         summary.json, and each plot as SVG.</p></body></html>"
    );
    h
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
            "frame,time_s,track,x,y,w,h,det_score,label,certain,p_value,entropy,p_happy,p_sad"
        ));
        let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
        assert!(html.contains("<svg") && html.contains("1 malformed lines"));
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
        // A second report into the same directory is refused and changes nothing.
        assert!(write_report(&rec, "run.jsonl", &dir).is_err());
        assert_eq!(std::fs::read_to_string(dir.join("faces.csv")).unwrap(), csv);
    }
}
