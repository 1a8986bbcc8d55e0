//! Accuracy through the whole face stage (`fer-cam eval --through-pipeline`): each test image is
//! rendered into a camera-like frame ([`render`]), the frames go through the daemon's own
//! pipeline ([`crate::pipeline::run`], the code `fer-cam run` uses, reading stills), and its
//! JSON lines are matched back to the true face squares. The report says how many faces were
//! found, how accurate the model is over all faces (a missed face counts as wrong) and over the
//! faces found, and how the daemon's crops are framed against the true squares.

pub mod render;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::capture::{Frame, FrameSource, SourceEvent};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::eval::{vote_labels, InModelClasses};
use crate::face::{crop_box, FaceBox};
use crate::infer::Classifier;
use crate::metrics;
use crate::pipeline::RunConfig;
pub use render::{Placement, RenderConfig};

/// A face counts as found when a detection's crop square overlaps the true square this much.
pub const FOUND_IOU: f32 = 0.3;

/// Crops per forward pass of the model on the images' own crops and the true squares.
const BATCH: usize = 64;

/// Face-size bins of the report, in frame pixels (lower bounds).
const SIZE_BINS: [u32; 6] = [0, 64, 96, 128, 192, 256];

/// Mean and standard deviation of one crop measure over the faces found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
}

impl Spread {
    fn of(xs: &[f64]) -> Self {
        if xs.is_empty() {
            return Self {
                mean: f64::NAN,
                std: f64::NAN,
            };
        }
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: var.sqrt(),
        }
    }
}

/// How the daemon's crop squares sit on the true face squares (faces found only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CropFraming {
    pub iou: Spread,
    /// Crop side over true side.
    pub scale: Spread,
    /// Crop centre minus true centre, over the true side (x right, y down).
    pub offset_x: Spread,
    pub offset_y: Spread,
}

/// Accuracy over a subset of the faces found: through the pipeline, and `eval` on their own
/// crops.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoundSubset {
    pub faces: usize,
    pub accuracy: f64,
    pub eval_accuracy: f64,
}

/// One face-size bin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SizeBin {
    /// Face side in frame pixels, `[lo, hi)`.
    pub lo: u32,
    pub hi: Option<u32>,
    pub faces: usize,
    pub found: usize,
    /// Accuracy over the faces found in the bin (NaN when none).
    pub accuracy_found: f64,
}

/// What `fer-cam eval --through-pipeline` reports (also its `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct HarnessReport {
    pub model: String,
    pub data: String,
    pub split: String,
    pub classes: Vec<String>,
    pub render: RenderConfig,
    /// The face stage's settings, as `fer-cam run` reading stills would use them.
    pub face_stage: String,
    pub faces: usize,
    pub found: usize,
    pub found_share: f64,
    /// Detections that matched no true face.
    pub false_detections: usize,
    /// CARD vote accuracy over every face, a missed face counting as wrong.
    pub accuracy_all: f64,
    /// CARD vote accuracy over the faces found.
    pub accuracy_found: f64,
    /// `fer-cam eval` on the same images' own 48x48 crops (same model and sampler settings),
    /// over all of them and over those the pipeline found.
    pub eval_accuracy: f64,
    pub eval_accuracy_found: f64,
    /// The model on a crop of each rendered frame at the true face square (a perfect detector
    /// and box→crop mapping), over all faces and over those the pipeline found: what the
    /// render's conditions cost, apart from the face stage.
    pub true_square_accuracy: f64,
    pub true_square_accuracy_found: f64,
    /// The faces found whose label passes Barsoum et al.'s majority protocol (FER+), when the
    /// data marks them: through the pipeline, and `eval` on their own crops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub barsoum_majority_found: Option<FoundSubset>,
    /// The faces found whose pixels no Training image repeats, when the data marks them: a
    /// model scores a face it was trained on better on its own crop than re-rendered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen_found: Option<FoundSubset>,
    /// Over the faces found.
    pub pavpu_ttest: f64,
    pub ece: f64,
    pub nll: f64,
    /// Per class (model classes): recall over all faces (missed = wrong) and the share found.
    pub per_class_recall: Vec<f64>,
    pub per_class_found: Vec<f64>,
    pub crop: CropFraming,
    pub by_size: Vec<SizeBin>,
    /// Images of classes the model lacks (not rendered).
    pub left_out: usize,
    pub wall_seconds: f64,
    pub faces_per_second: f64,
}

/// The rendered test images as a still source for the pipeline.
struct RenderedSource {
    faces: Arc<Dataset>,
    cfg: RenderConfig,
    next: usize,
}

impl FrameSource for RenderedSource {
    fn next_event(&mut self) -> Result<SourceEvent> {
        if self.next >= self.faces.len() {
            return Ok(SourceEvent::End);
        }
        let i = self.next;
        self.next += 1;
        let (img, _) = render::render(&self.cfg, i, self.faces.image(i))?;
        Ok(SourceEvent::Frame(Frame {
            seq: i as u64,
            captured: Instant::now(),
            wall: SystemTime::now(),
            width: img.width(),
            height: img.height(),
            gray: img.into_raw(),
            label: Some(format!("render-{i}")),
            chroma: None,
            pts: None,
        }))
    }

    fn name(&self) -> String {
        format!("render:seed{}", self.cfg.seed)
    }
}

/// One detected face of a frame line: its box and the model's answer.
struct Detection {
    bbox: FaceBox,
    label: usize,
    probs: Vec<f32>,
    p_value: f64,
}

/// Reads the pipeline's JSON lines back: per frame number, its faces.
fn parse_frames(out: &[u8], classes: &[String], n: usize) -> Result<Vec<Vec<Detection>>> {
    let mut frames: Vec<Vec<Detection>> = (0..n).map(|_| Vec::new()).collect();
    let bad = |m: String| Error::Msg(format!("through-pipeline: {m}"));
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| bad(format!("unreadable output line: {e}")))?;
        if v["type"] != "frame" {
            continue;
        }
        let k = v["frame"]
            .as_u64()
            .filter(|&k| (k as usize) < n)
            .ok_or_else(|| bad(format!("frame line without a valid frame number: {v}")))?;
        for f in v["faces"].as_array().into_iter().flatten() {
            let b: Vec<f32> = f["box"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default();
            let probs: Vec<f32> = f["probs"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default();
            let label = f["label"]
                .as_str()
                .and_then(|l| classes.iter().position(|c| c == l));
            let (Some(label), [x, y, w, h]) = (label, b.as_slice()) else {
                return Err(bad(format!("a face without box or known label: {f}")));
            };
            if probs.len() != classes.len() {
                return Err(bad(format!("a face with {} probabilities", probs.len())));
            }
            frames[k as usize].push(Detection {
                bbox: FaceBox {
                    x: *x,
                    y: *y,
                    w: *w,
                    h: *h,
                    score: 0.0,
                    roll: None,
                },
                label,
                probs,
                p_value: f["p_value"].as_f64().unwrap_or(f64::NAN),
            });
        }
    }
    Ok(frames)
}

/// The detection taken as a rendered face: its crop box's IoU with the true square, the crop
/// box, and the detection.
type Match<'a> = (f32, FaceBox, &'a Detection);

/// Renders every image of `data` (one split), runs the frames through the pipeline with
/// `pipeline_clf` under `run_cfg`, scores `eval_clf` (the same model) on the images' own crops,
/// and compares.
pub fn run(
    pipeline_clf: Classifier,
    eval_clf: &mut Classifier,
    data: &Dataset,
    run_cfg: &RunConfig,
    render_cfg: &RenderConfig,
    face_stage: String,
) -> Result<HarnessReport> {
    render_cfg.validate()?;
    let classes = pipeline_clf.config().classes.clone();
    let InModelClasses {
        data: kept, labels, ..
    } = InModelClasses::new(&classes, data)?;
    if kept.is_empty() {
        return Err(Error::Msg("no images to render".into()));
    }
    let n = kept.len();
    let start = Instant::now();
    // The model on the images' own crops, as `fer-cam eval` scores it.
    let direct = vote_labels(eval_clf, &kept.pixels, BATCH, |_| {})?;
    let kept = Arc::new(kept);
    let source = RenderedSource {
        faces: kept.clone(),
        cfg: render_cfg.clone(),
        next: 0,
    };
    let mut out = Vec::new();
    let cancel = Arc::new(AtomicBool::new(false));
    let stats = crate::pipeline::run(
        run_cfg,
        move || Ok(Box::new(source) as Box<dyn FrameSource>),
        pipeline_clf,
        &mut out,
        cancel,
    )?;
    if stats.dropped > 0 || stats.frames as usize != n {
        return Err(Error::Msg(format!(
            "through-pipeline: {} of {n} frames processed, {} dropped",
            stats.frames, stats.dropped
        )));
    }
    let frames = parse_frames(&out, &classes, n)?;
    let margin = run_cfg.margin;
    let c = classes.len();
    // Per face: its placement, and the detection taken as it (with its crop box), if any.
    let mut square_crops = Vec::with_capacity(n * crate::data::FACE_PIXELS);
    let mut matched: Vec<(Placement, Option<Match>)> = Vec::with_capacity(n);
    let mut false_detections = 0;
    for (i, dets) in frames.iter().enumerate() {
        let (frame, p) = render::render(render_cfg, i, kept.image(i))?;
        let truth = p.square();
        square_crops.extend(crate::face::crop_face(
            frame.as_raw(),
            frame.width(),
            frame.height(),
            &truth,
            0.0,
            crate::data::FACE_SIZE as u32,
        ));
        let best = dets
            .iter()
            .map(|d| {
                let cb = crop_box(&d.bbox, margin);
                (cb.iou(&truth), cb, d)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .filter(|(iou, _, _)| *iou >= FOUND_IOU);
        false_detections += dets.len() - usize::from(best.is_some());
        matched.push((p, best));
    }
    let true_square = vote_labels(eval_clf, &square_crops, BATCH, |_| {})?;
    // The faces found: row, predicted label, the detection.
    let found_rows: Vec<usize> = (0..n).filter(|&i| matched[i].1.is_some()).collect();
    let found_det = |i: usize| matched[i].1.expect("a found face").2;
    let found_pred: Vec<usize> = found_rows.iter().map(|&i| found_det(i).label).collect();
    let found_labels: Vec<usize> = found_rows.iter().map(|&i| labels[i]).collect();
    let on_found = |v: &[usize]| found_rows.iter().map(|&i| v[i]).collect::<Vec<_>>();
    // A missed face is wrong whatever the model would have said.
    let all_pred: Vec<usize> = matched
        .iter()
        .map(|(_, m)| m.map_or(usize::MAX, |(_, _, d)| d.label))
        .collect();
    let (mut ious, mut scales, mut dxs, mut dys) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (p, m) in &matched {
        if let Some((iou, cb, _)) = m {
            let side = p.side;
            ious.push(*iou as f64);
            scales.push((cb.w / side) as f64);
            dxs.push(((cb.x + cb.w / 2.0 - p.cx) / side) as f64);
            dys.push(((cb.y + cb.h / 2.0 - p.cy) / side) as f64);
        }
    }
    let mut bins: Vec<SizeBin> = SIZE_BINS
        .iter()
        .enumerate()
        .map(|(k, &lo)| SizeBin {
            lo,
            hi: SIZE_BINS.get(k + 1).copied(),
            faces: 0,
            found: 0,
            accuracy_found: 0.0,
        })
        .collect();
    for (i, (p, m)) in matched.iter().enumerate() {
        let bin = bins
            .iter_mut()
            .rev()
            .find(|b| p.side >= b.lo as f32)
            .expect("the first bin starts at 0");
        bin.faces += 1;
        if let Some((_, _, d)) = m {
            bin.found += 1;
            bin.accuracy_found += f64::from(u8::from(d.label == labels[i]));
        }
    }
    for b in &mut bins {
        b.accuracy_found /= b.found as f64;
    }
    bins.retain(|b| b.faces > 0);
    let wall = start.elapsed().as_secs_f64();
    let accurate: Vec<bool> = found_pred
        .iter()
        .zip(&found_labels)
        .map(|(p, l)| p == l)
        .collect();
    let found_probs: Vec<Vec<f32>> = found_rows
        .iter()
        .map(|&i| found_det(i).probs.clone())
        .collect();
    let found_p: Vec<f64> = found_rows.iter().map(|&i| found_det(i).p_value).collect();
    // Recall over all faces: a missed face (`usize::MAX`) stays in its class's row as a miss
    // (`metrics::confusion_matrix` would drop it, giving recall over the faces found).
    let (mut class_counts, mut hits, mut found_per_class) =
        (vec![0usize; c], vec![0; c], vec![0; c]);
    for (&p, &l) in all_pred.iter().zip(&labels) {
        class_counts[l] += 1;
        hits[l] += usize::from(p == l);
    }
    for &l in &found_labels {
        found_per_class[l] += 1;
    }
    let found = found_pred.len();
    // The faces found among the rows `mark` (a per-row flag of the data) holds; `None` when
    // the data has no such flags.
    let found_among = |mark: &[bool], want: bool| -> Option<FoundSubset> {
        if mark.is_empty() {
            return None;
        }
        let rows: Vec<usize> = found_rows
            .iter()
            .copied()
            .filter(|&i| mark[i] == want)
            .collect();
        let on = |v: &[usize]| rows.iter().map(|&i| v[i]).collect::<Vec<_>>();
        let labels = on(&labels);
        let through: Vec<usize> = rows.iter().map(|&i| found_det(i).label).collect();
        Some(FoundSubset {
            faces: rows.len(),
            accuracy: metrics::accuracy(&through, &labels),
            eval_accuracy: metrics::accuracy(&on(&direct), &labels),
        })
    };
    let barsoum_majority_found = found_among(&kept.strict_majority, true);
    let unseen_found = found_among(&kept.seen_in_training, false);
    Ok(HarnessReport {
        model: String::new(),
        data: String::new(),
        split: String::new(),
        classes,
        render: render_cfg.clone(),
        face_stage,
        faces: n,
        found,
        found_share: found as f64 / n as f64,
        false_detections,
        accuracy_all: metrics::accuracy(&all_pred, &labels),
        accuracy_found: metrics::accuracy(&found_pred, &found_labels),
        eval_accuracy: metrics::accuracy(&direct, &labels),
        eval_accuracy_found: metrics::accuracy(&on_found(&direct), &found_labels),
        true_square_accuracy: metrics::accuracy(&true_square, &labels),
        true_square_accuracy_found: metrics::accuracy(&on_found(&true_square), &found_labels),
        barsoum_majority_found,
        unseen_found,
        pavpu_ttest: metrics::pavpu_ttest(&accurate, &found_p, eval_clf.config().card.alpha),
        ece: metrics::ece(&found_probs, &found_labels, 15),
        nll: metrics::nll(&found_probs, &found_labels),
        per_class_recall: hits
            .iter()
            .zip(&class_counts)
            .map(|(&h, &t)| {
                if t == 0 {
                    f64::NAN
                } else {
                    h as f64 / t as f64
                }
            })
            .collect(),
        per_class_found: found_per_class
            .iter()
            .zip(&class_counts)
            .map(|(&f, &t)| f as f64 / t as f64)
            .collect(),
        crop: CropFraming {
            iou: Spread::of(&ious),
            scale: Spread::of(&scales),
            offset_x: Spread::of(&dxs),
            offset_y: Spread::of(&dys),
        },
        by_size: bins,
        left_out: data.len() - n,
        wall_seconds: wall,
        faces_per_second: n as f64 / wall.max(1e-9),
    })
}

impl std::fmt::Display for HarnessReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |x: f64| format!("{:.2}%", 100.0 * x);
        let r = &self.render;
        writeln!(f, "model:    {}", self.model)?;
        writeln!(
            f,
            "data:     {} [{}], {} faces",
            self.data, self.split, self.faces
        )?;
        writeln!(
            f,
            "render:   seed {}, {}x{} frames, faces {}-{} px, roll ±{}°, gain {}-{}, gamma {}-{}, \
             downscale p={} to >= {}, blur sigma <= {}, noise sd <= {}",
            r.seed,
            r.frame_width,
            r.frame_height,
            r.face_min,
            r.face_max,
            r.rotate_deg,
            r.gain.0,
            r.gain.1,
            r.gamma.0,
            r.gamma.1,
            r.downscale_p,
            r.downscale_min,
            r.blur_max,
            r.noise_max
        )?;
        writeln!(f, "face stage: {}", self.face_stage)?;
        writeln!(
            f,
            "faces found:                {} of {} ({}), {} false detections",
            self.found,
            self.faces,
            pct(self.found_share),
            self.false_detections
        )?;
        writeln!(f, "accuracy, all faces:        {}", pct(self.accuracy_all))?;
        writeln!(
            f,
            "accuracy, faces found:      {}",
            pct(self.accuracy_found)
        )?;
        writeln!(
            f,
            "eval on the same images:    {} (all), {} (the faces found)",
            pct(self.eval_accuracy),
            pct(self.eval_accuracy_found)
        )?;
        writeln!(
            f,
            "crop at the true square:    {} (all), {} (the faces found)",
            pct(self.true_square_accuracy),
            pct(self.true_square_accuracy_found)
        )?;
        if let Some(u) = self
            .unseen_found
            .as_ref()
            .filter(|u| u.faces > 0 && u.faces < self.found)
        {
            writeln!(
                f,
                "no Training image repeats: {} of the faces found: {} through the pipeline, {} on their own crops",
                u.faces,
                pct(u.accuracy),
                pct(u.eval_accuracy)
            )?;
        }
        if let Some(b) = &self.barsoum_majority_found {
            writeln!(
                f,
                "Barsoum et al.'s majority:  {} of the faces found: {} through the pipeline, {} on their own crops",
                b.faces,
                pct(b.accuracy),
                pct(b.eval_accuracy)
            )?;
        }
        writeln!(
            f,
            "PAvPU (t-test), found:      {}   ECE {:.4}   NLL {:.4}",
            pct(self.pavpu_ttest),
            self.ece,
            self.nll
        )?;
        let c = &self.crop;
        writeln!(
            f,
            "crop vs true square:        IoU {:.3} ± {:.3}, scale {:.3} ± {:.3}, offset x {:+.3} ± {:.3}, y {:+.3} ± {:.3} (of the side)",
            c.iou.mean,
            c.iou.std,
            c.scale.mean,
            c.scale.std,
            c.offset_x.mean,
            c.offset_x.std,
            c.offset_y.mean,
            c.offset_y.std
        )?;
        writeln!(f, "by face size (px): found, accuracy of those found")?;
        for b in &self.by_size {
            let hi = b.hi.map_or("+".to_string(), |h| format!("-{h}"));
            writeln!(
                f,
                "  {:>4}{:<5} {:>5} of {:>5} ({:>6}), {}",
                b.lo,
                hi,
                b.found,
                b.faces,
                pct(b.found as f64 / b.faces as f64),
                if b.found > 0 {
                    pct(b.accuracy_found)
                } else {
                    "–".into()
                }
            )?;
        }
        writeln!(f, "per class: recall (all faces), found")?;
        for ((name, r), fo) in self
            .classes
            .iter()
            .zip(&self.per_class_recall)
            .zip(&self.per_class_found)
        {
            if r.is_nan() {
                writeln!(f, "  {name:>9}  – (no images)")?;
            } else {
                writeln!(f, "  {name:>9}  {:>7}  {:>7}", pct(*r), pct(*fo))?;
            }
        }
        write!(
            f,
            "time: {:.1} s, {:.1} faces/s",
            self.wall_seconds, self.faces_per_second
        )
    }
}
