//! The report's SVG plots, drawn into strings (the HTML page inlines them; the same text is
//! saved beside it). SVG keeps text as text, so no font files are needed.

use plotters::prelude::*;

use super::{FrameRec, TrackStats};
use crate::error::{Error, Result};
use crate::palette::class_rgb;

/// Most points drawn per line; longer tracks are averaged over buckets of frames.
const MAX_POINTS: usize = 1500;

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("cannot draw the {what} plot: {e}"))
}

fn color(name: &str, i: usize) -> RGBColor {
    let (r, g, b) = class_rgb(name, i);
    RGBColor(r, g, b)
}

/// Text as SVG may hold it: XML 1.0 forbids control characters (a class name read from a
/// damaged or hostile run file may have them), so each becomes `?`; plotters escapes `<`, `&`.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Width of the class key drawn right of a chart.
const KEY_WIDTH: u32 = 120;

/// Splits off the right strip of `root` and draws the class key there (a colour patch and the
/// name per class), so the key never covers data.
fn with_key<'a>(
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    classes: &[String],
    what: &str,
) -> Result<DrawingArea<SVGBackend<'a>, plotters::coord::Shift>> {
    let (w, _) = root.dim_in_pixel();
    let (plot, key) = root.split_horizontally(w.saturating_sub(KEY_WIDTH));
    for (i, name) in classes.iter().enumerate() {
        let y = 40 + 20 * i as i32;
        key.draw(&Rectangle::new(
            [(4, y - 5), (18, y + 5)],
            color(name, i).filled(),
        ))
        .map_err(|e| fail(what, e))?;
        key.draw(&Text::new(
            printable(name),
            (24, y - 7),
            ("sans-serif", 17).into_font(),
        ))
        .map_err(|e| fail(what, e))?;
    }
    Ok(plot)
}

/// One sample of a track: its frame, where it sits on the time axis, its probabilities and
/// whether its label was certain.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub frame: u64,
    pub x: f64,
    pub probs: Vec<f64>,
    pub certain: bool,
}

/// A track's samples in frame order.
pub type TrackSeries = Vec<Sample>;

/// The samples of one track from the frames, placed at `x(frame)` (media seconds, or the frame
/// number when the run has no media time).
pub fn track_series(frames: &[FrameRec], track: u64, x: impl Fn(&FrameRec) -> f64) -> TrackSeries {
    frames
        .iter()
        .flat_map(|f| {
            let at = x(f);
            f.faces
                .iter()
                .filter(move |face| face.track == track)
                .map(move |face| Sample {
                    frame: f.frame,
                    x: at,
                    probs: face.probs.clone(),
                    certain: face.certain,
                })
        })
        .collect()
}

/// The SVG that plotters drew, made to scale with the page: a `viewBox` of its drawn size and
/// a width of 100% (the height follows), so it fits a phone's screen.
pub fn responsive(svg: String) -> String {
    let Some(end) = svg.find('>') else {
        return svg;
    };
    let head = &svg[..end];
    let attr = |name: &str| -> Option<String> {
        let at = head.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = head[at..].find('"')?;
        Some(head[at..at + len].to_string())
    };
    let (Some(w), Some(h)) = (attr("width"), attr("height")) else {
        return svg;
    };
    let mut out = head
        .replacen(&format!(" width=\"{w}\""), " width=\"100%\"", 1)
        .replacen(&format!(" height=\"{h}\""), "", 1);
    if !out.contains("viewBox") {
        out.push_str(&format!(" viewBox=\"0 0 {w} {h}\""));
    }
    out.push_str(" preserveAspectRatio=\"xMinYMin meet\"");
    out + &svg[end..]
}

/// Splits a series where the track was missing for much longer than its usual frame step, so
/// lines do not bridge detection gaps.
fn segments(series: &TrackSeries) -> Vec<&[Sample]> {
    let mut steps: Vec<u64> = series
        .windows(2)
        .map(|w| w[1].frame.saturating_sub(w[0].frame))
        .collect();
    steps.sort_unstable();
    let usual = steps.get(steps.len() / 2).copied().unwrap_or(1).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..series.len() {
        if series[i].frame.saturating_sub(series[i - 1].frame) > 5 * usual {
            out.push(&series[start..i]);
            start = i;
        }
    }
    if start < series.len() {
        out.push(&series[start..]);
    }
    out
}

/// Bucket means of a segment's probabilities: at most `MAX_POINTS` (x, probs) points.
fn thin(seg: &[Sample]) -> Vec<(f64, Vec<f64>)> {
    let per = seg.len().div_ceil(MAX_POINTS).max(1);
    seg.chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            let x = c.iter().map(|s| s.x).sum::<f64>() / n;
            let mut p = vec![0.0; c[0].probs.len()];
            for s in c {
                for (a, b) in p.iter_mut().zip(&s.probs) {
                    *a += b / n;
                }
            }
            (x, p)
        })
        .collect()
}

/// The uncertain stretches of a track as `(from, to)` on the time axis: each uncertain sample
/// reaches to the next sample (the last one by `step`), touching stretches are one band, and
/// bands closer than a 1/[`MAX_POINTS`] of the axis (`span`) merge, so a long track draws at
/// most about `MAX_POINTS` rectangles however its certainty flickers.
fn uncertain_bands(series: &TrackSeries, step: f64, span: f64) -> Vec<(f64, f64)> {
    let join = span / MAX_POINTS as f64;
    let mut bands: Vec<(f64, f64)> = Vec::new();
    for (i, s) in series.iter().enumerate() {
        if s.certain {
            continue;
        }
        let end = series.get(i + 1).map_or(s.x + step, |n| n.x);
        match bands.last_mut() {
            Some(last) if s.x - last.1 <= join => last.1 = last.1.max(end),
            _ => bands.push((s.x, end)),
        }
    }
    bands
}

/// Probabilities over time of one track, one line per class, uncertain stretches shaded;
/// `x_desc` names the time axis (media seconds or frames).
pub fn timeline(
    track: u64,
    series: &TrackSeries,
    classes: &[String],
    x_desc: &str,
) -> Result<String> {
    let what = "timeline";
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(what, e))?;
        let plot = with_key(&root, classes, what)?;
        let x0 = series.first().map_or(0.0, |s| s.x);
        // The last sample's band reaches one frame step past it.
        let step = series
            .windows(2)
            .map(|w| w[1].x - w[0].x)
            .filter(|d| *d > 0.0)
            .fold(f64::INFINITY, f64::min);
        let step = if step.is_finite() { step } else { 1.0 };
        let x1 = (series.last().map_or(1.0, |s| s.x) + step).max(x0 + step);
        let mut chart = ChartBuilder::on(&plot)
            .caption(
                format!("track #{track}: class probabilities (grey: uncertain)"),
                ("sans-serif", 20),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(44)
            .build_cartesian_2d(x0..x1, 0.0..1.0)
            .map_err(|e| fail(what, e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("probability")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 17))
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.1}")
                }
            })
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| fail(what, e))?;
        // Uncertain frames: a grey band from each to the next sample of the track.
        let shade = RGBColor(215, 215, 215).filled();
        chart
            .draw_series(
                uncertain_bands(series, step, x1 - x0)
                    .into_iter()
                    .map(|(a, b)| Rectangle::new([(a, 0.0), (b, 1.0)], shade)),
            )
            .map_err(|e| fail(what, e))?;
        let segs: Vec<Vec<(f64, Vec<f64>)>> = segments(series).into_iter().map(thin).collect();
        for (ci, name) in classes.iter().enumerate() {
            let c = color(name, ci);
            for seg in &segs {
                let pts: Vec<(f64, f64)> = seg.iter().map(|(x, p)| (*x, p[ci])).collect();
                if pts.len() == 1 {
                    chart.draw_series([Circle::new(pts[0], 2, c.filled())])
                } else {
                    chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))
                }
                .map_err(|e| fail(what, e))?;
            }
        }
        root.present().map_err(|e| fail(what, e))?;
    }
    Ok(svg)
}

/// Share of each track's frames per label, as stacked horizontal bars (largest tracks first).
pub fn shares(tracks: &[&TrackStats], classes: &[String]) -> Result<String> {
    let what = "emotion share";
    let mut svg = String::new();
    {
        let rows = tracks.len().max(1);
        let height = (100 + 28 * rows as u32).max(60 + 18 * classes.len() as u32);
        let root = SVGBackend::with_string(&mut svg, (760, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(what, e))?;
        let plot = with_key(&root, classes, what)?;
        let mut chart = ChartBuilder::on(&plot)
            .caption(
                "share of each track's frames per emotion",
                ("sans-serif", 20),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(8)
            .build_cartesian_2d(0.0..1.0, 0.0..rows as f64)
            .map_err(|e| fail(what, e))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("share of frames")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 17))
            .x_label_formatter(&|x| format!("{:.0}%", 100.0 * x))
            .draw()
            .map_err(|e| fail(what, e))?;
        for (ci, name) in classes.iter().enumerate() {
            let c = color(name, ci);
            let bars = tracks.iter().enumerate().map(|(row, t)| {
                let left: f64 = t.share[..ci].iter().sum();
                let y = (rows - 1 - row) as f64;
                Rectangle::new(
                    [(left, y + 0.15), (left + t.share[ci], y + 0.85)],
                    c.filled(),
                )
            });
            chart.draw_series(bars).map_err(|e| fail(what, e))?;
        }
        // Each bar is named inside its left end.
        let label = ("sans-serif", 16).into_font().color(&BLACK);
        chart
            .draw_series(tracks.iter().enumerate().map(|(row, t)| {
                let y = (rows - 1 - row) as f64 + 0.5;
                Text::new(format!("#{}", t.track), (0.005, y), label.clone())
            }))
            .map_err(|e| fail(what, e))?;
        root.present().map_err(|e| fail(what, e))?;
    }
    Ok(svg)
}

/// Histogram of capture→emit latency with the p50 and p95 marked.
pub fn latency(values: &[f64], p50: f64, p95: f64) -> Result<String> {
    let what = "latency";
    let mut svg = String::new();
    {
        let hi = values.iter().copied().fold(1.0, f64::max) * 1.02;
        let bins = 40usize;
        let width = hi / bins as f64;
        let mut counts = vec![0u64; bins];
        for v in values {
            counts[((v / width) as usize).min(bins - 1)] += 1;
        }
        let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
        let root = SVGBackend::with_string(&mut svg, (760, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(what, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("capture→emit latency per frame (p50 {p50:.1} ms, p95 {p95:.1} ms)"),
                ("sans-serif", 20),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..hi, 0.0..top)
            .map_err(|e| fail(what, e))?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("frames")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 17))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| fail(what, e))?;
        let bar = RGBColor(70, 120, 200).filled();
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &n)| {
                let x = i as f64 * width;
                Rectangle::new([(x, 0.0), (x + width * 0.92, n as f64)], bar)
            }))
            .map_err(|e| fail(what, e))?;
        for (v, c, name) in [(p50, BLACK, "p50"), (p95, RED, "p95")] {
            chart
                .draw_series(LineSeries::new([(v, 0.0), (v, top)], c.stroke_width(2)))
                .map_err(|e| fail(what, e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(|e| fail(what, e))?;
        root.present().map_err(|e| fail(what, e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_lines_and_long_tracks_are_thinned() {
        let sample = |f: u64, p: Vec<f64>, certain: bool| Sample {
            frame: f,
            x: f as f64 / 25.0,
            probs: p,
            certain,
        };
        let s: TrackSeries = [0u64, 1, 2, 3, 40, 41]
            .iter()
            .map(|&f| sample(f, vec![0.5, 0.5], true))
            .collect();
        let segs = segments(&s);
        assert_eq!(segs.iter().map(|x| x.len()).collect::<Vec<_>>(), vec![4, 2]);
        let long: TrackSeries = (0..10_000)
            .map(|f| sample(f, vec![1.0, 0.0], false))
            .collect();
        let t = thin(&long);
        assert!(t.len() <= MAX_POINTS && t.len() > MAX_POINTS / 2);
        assert!((t[0].1[0] - 1.0).abs() < 1e-12 && t[0].1[1] == 0.0);
    }

    #[test]
    fn uncertain_bands_merge_and_stay_few() {
        let sample = |f: u64, certain: bool| Sample {
            frame: f,
            x: f as f64,
            probs: vec![0.5, 0.5],
            certain,
        };
        let s: TrackSeries = [(0, false), (1, false), (2, true), (3, false)]
            .into_iter()
            .map(|(f, c)| sample(f, c))
            .collect();
        assert_eq!(uncertain_bands(&s, 1.0, 4.0), vec![(0.0, 2.0), (3.0, 4.0)]);
        // 100,000 frames flickering between certain and not: bounded.
        let flicker: TrackSeries = (0..100_000).map(|f| sample(f, f % 2 == 0)).collect();
        let bands = uncertain_bands(&flicker, 1.0, 100_000.0);
        assert!(bands.len() <= MAX_POINTS + 1, "{}", bands.len());
        let svg = timeline(1, &flicker, &["a".into(), "b".into()], "frame").unwrap();
        assert!(svg.matches("<rect").count() < 3 * MAX_POINTS);
    }

    #[test]
    fn plots_are_svg_with_their_titles() {
        let classes = vec!["happy".to_string(), "sad".to_string()];
        let s: TrackSeries = (0..5)
            .map(|f| Sample {
                frame: f,
                x: f as f64 * 0.5,
                probs: vec![0.7, 0.3],
                certain: f % 2 == 0,
            })
            .collect();
        let svg = timeline(3, &s, &classes, "media time (s)").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("track #3") && svg.contains("happy"));
        assert!(svg.contains("media time (s)"));
        // Scaled to the page: 100% wide, with the drawn size as its viewBox.
        let r = responsive(svg);
        assert!(
            r.starts_with("<svg") && r.contains("width=\"100%\""),
            "{}",
            &r[..200]
        );
        assert!(
            r.contains("viewBox=\"0 0 760 300\"") && !r[..r.find('>').unwrap()].contains("height=")
        );
        let t = TrackStats {
            track: 3,
            share: vec![0.25, 0.75],
            ..Default::default()
        };
        assert!(shares(&[&t], &classes).unwrap().contains("#3"));
        assert!(latency(&[1.0, 2.0, 30.0], 2.0, 30.0)
            .unwrap()
            .contains("p95"));
        // Class names with control characters or markup still give well-formed SVG.
        let odd = vec!["a\u{1}b".to_string(), "<x&y>".to_string()];
        let svg = timeline(1, &s, &odd, "frame").unwrap();
        assert!(!svg.chars().any(|c| c.is_control() && c != '\n'));
        assert!(svg.contains("a?b") && svg.contains("&lt;x&amp;y&gt;"));
        // An empty run still draws (no frames at all).
        assert!(latency(&[], 0.0, 0.0).is_ok());
    }
}
