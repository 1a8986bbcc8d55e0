//! rustface detection with the SeetaFace frontal model embedded in the binary, and the search
//! around a track by rustface or BlazeFace ([`NearDetector`]).
//!
//! rustface costs ~66 ms on a full 640x480 frame here, so full frames are downscaled to
//! `detect_width` first, and between full detections the stage only searches small regions
//! around live tracks (see `crate::pipeline`).

use image::imageops::FilterType;
use image::GrayImage;
use rustface::{Detector, ImageData};

use super::blazeface::{self, BlazeFace};
use super::{distinct, FaceBox, SAME_FACE_IOU};
use crate::error::{Error, Result};

/// The SeetaFace frontal detector model (BSD-2-Clause, see models/).
static SEETA_MODEL: &[u8] = include_bytes!("../../models/seeta_fd_frontal_v1.0.bin");

/// Detection settings, validated before the pipeline starts.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectConfig {
    /// Full frames wider than this are downscaled before detection (0: never).
    pub detect_width: u32,
    /// A full-frame detection every N frames; in between, only regions around tracks.
    pub every: u32,
    /// Smallest face side searched, in detector pixels (≥ 20).
    pub min_face: u32,
    /// Detector score threshold (rustface's default is 2.0).
    pub score_threshold: f64,
    /// Region rustface searches around a track, as a multiple of its box side (BlazeFace's is
    /// fixed, `BLAZE_ROI`).
    pub roi_scale: f32,
    /// The network that searches the regions around tracks.
    pub near: NearDetector,
    /// What searches whole frames.
    pub full: FullDetector,
}

/// What searches a whole frame for faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullDetector {
    /// rustface (SeetaFace frontal) on the frame downscaled to `detect_width`.
    Rustface,
    /// BlazeFace on overlapping square tiles at a few scales ([`tiles`]), for faces from
    /// `min_face` (in frame pixels) or [`TILE_MIN_FACE`] up.
    BlazeFace,
    /// Both, one box per face: BlazeFace's where both find it. rustface's other faces are
    /// searched again by BlazeFace around the box for their eyes (the crop's roll). The default:
    /// `eval --through-pipeline` on PublicTest renders finds 90% of faces with rustface alone and
    /// 98-99% with BlazeFace's tiles (docs/pipeline.md, "Through the pipeline").
    #[default]
    Both,
}

impl std::str::FromStr for FullDetector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rustface" => Ok(Self::Rustface),
            "blazeface" => Ok(Self::BlazeFace),
            "both" => Ok(Self::Both),
            _ => Err(Error::Config(format!(
                "--full-detector {s} (allowed: both, blazeface, rustface)"
            ))),
        }
    }
}

/// The network that searches the region around each track between full-frame searches (which
/// rustface always does: it finds faces of any size down to `min_face`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NearDetector {
    /// rustface on the region, scaled so the face is about 64 px.
    Rustface,
    /// MediaPipe BlazeFace (short range) on the region resampled to 128x128: the default, by
    /// measurement on the shared clips (docs/pipeline.md, "Face detectors").
    #[default]
    BlazeFace,
}

impl std::str::FromStr for NearDetector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rustface" => Ok(Self::Rustface),
            "blazeface" => Ok(Self::BlazeFace),
            _ => Err(Error::Config(format!(
                "--detector {s} (allowed: rustface, blazeface)"
            ))),
        }
    }
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            detect_width: 320,
            every: 3,
            min_face: 20,
            score_threshold: 2.0,
            roi_scale: 1.6,
            near: NearDetector::BlazeFace,
            full: FullDetector::Both,
        }
    }
}

impl DetectConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.detect_width != 0 && self.detect_width < 64 {
            return bad(format!(
                "--detect-width {} (0 or at least 64)",
                self.detect_width
            ));
        }
        if !(1..=1000).contains(&self.every) {
            return bad(format!("--detect-every {} (allowed 1..=1000)", self.every));
        }
        if !(20..=1000).contains(&self.min_face) {
            return bad(format!("--min-face {} (allowed 20..=1000)", self.min_face));
        }
        // rustface asserts a positive threshold; 1000 is far above any real face score.
        if !(self.score_threshold > 0.0 && self.score_threshold <= 1000.0) {
            return bad(format!(
                "--det-threshold {} (allowed 0 < t <= 1000)",
                self.score_threshold
            ));
        }
        if !(1.2..=6.0).contains(&self.roi_scale) {
            return bad(format!("roi scale {} (allowed 1.2..=6)", self.roi_scale));
        }
        Ok(())
    }
}

/// A rustface detector (not `Send`: build it inside the face thread).
pub struct FaceDetector {
    det: Box<dyn Detector>,
    cfg: DetectConfig,
    /// BlazeFace, when it searches around tracks.
    blaze: Option<BlazeFace>,
}

/// Smallest image side rustface handles well (its window is 40 px).
const MIN_SIDE: u32 = 48;

/// Side, in detector pixels, that a tracked face is scaled to for the search around it. Measured
/// on the 640x360 clip (`run --realtime --stats`): 50 px lost the face on 65 of 600 frames at
/// 3.4 ms a search, 64 px on 2 at 6.4 ms, 80 px on 1 at 9.6 ms.
const ROI_FACE: f32 = 64.0;

impl FaceDetector {
    pub fn new(cfg: DetectConfig) -> Result<Self> {
        cfg.validate()?;
        let model = rustface::read_model(std::io::Cursor::new(SEETA_MODEL))
            .map_err(|e| Error::Msg(format!("embedded face model: {e}")))?;
        let mut det = rustface::create_detector_with_model(model);
        det.set_min_face_size(cfg.min_face);
        det.set_score_thresh(cfg.score_threshold);
        det.set_pyramid_scale_factor(0.8);
        det.set_slide_window_step(4, 4);
        let blaze = if cfg.near == NearDetector::BlazeFace || cfg.full != FullDetector::Rustface {
            Some(BlazeFace::embedded()?)
        } else {
            None
        };
        Ok(Self { det, cfg, blaze })
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    fn run(&mut self, gray: &[u8], w: u32, h: u32, min_face: u32) -> Vec<FaceBox> {
        if w < MIN_SIDE || h < MIN_SIDE || gray.len() != (w * h) as usize {
            return Vec::new();
        }
        self.det.set_min_face_size(min_face);
        let img = ImageData::new(gray, w, h);
        self.det
            .detect(&img)
            .into_iter()
            .map(|f| {
                let b = f.bbox();
                FaceBox {
                    x: b.x() as f32,
                    y: b.y() as f32,
                    w: b.width() as f32,
                    h: b.height() as f32,
                    score: f.score(),
                    roll: None,
                }
            })
            .collect()
    }

    /// Detects faces on a whole frame, boxes in frame pixels (see [`FullDetector`]).
    pub fn detect_full(&mut self, gray: &[u8], w: u32, h: u32) -> Vec<FaceBox> {
        self.detect_full_yielding(gray, w, h, &mut || {})
    }

    /// [`Self::detect_full`], calling `between` between its pieces of work (each BlazeFace
    /// tile or second look, about 2 ms, and the rustface search): the pipeline's search beside
    /// the frames waits there while a frame is being processed, so it does not hold a core a
    /// frame needs.
    pub fn detect_full_yielding(
        &mut self,
        gray: &[u8],
        w: u32,
        h: u32,
        between: &mut dyn FnMut(),
    ) -> Vec<FaceBox> {
        if gray.len() != (w as usize) * (h as usize) || w == 0 || h == 0 {
            return Vec::new();
        }
        let rustface = match (self.cfg.full, &self.blaze) {
            (FullDetector::Rustface, _) | (_, None) => return self.rustface_full(gray, w, h),
            (FullDetector::BlazeFace, Some(_)) => false,
            (FullDetector::Both, Some(_)) => true,
        };
        let net = self.blaze.as_ref().expect("checked above");
        let candidates = blaze_full(net, gray, w, h, self.min_face_in_frame(w), between);
        let others = if rustface {
            between();
            self.rustface_full(gray, w, h)
        } else {
            Vec::new()
        };
        let net = self.blaze.as_ref().expect("checked above");
        // A face from the tiles that rustface did not also find gets a second look (on 600
        // PublicTest renders: 585 found and 4 false faces with it, 593 and 10 without; on the
        // single-face still at 640x480 it removes a face found on the shirt).
        let mut found: Vec<FaceBox> = candidates
            .into_iter()
            .filter(|c| {
                others.iter().any(|o| o.iou(c) >= SAME_FACE_IOU) || {
                    between();
                    second_look(net, gray, w, h, c)
                }
            })
            .collect();
        for b in others {
            if found.iter().all(|k| k.iou(&b) < SAME_FACE_IOU) {
                // Its eyes, from BlazeFace around it, when BlazeFace sees it there.
                let better = blaze_near(net, gray, w, h, &b, BLAZE_THRESHOLD)
                    .into_iter()
                    .filter(|n| n.iou(&b) >= SAME_FACE_IOU)
                    .max_by(|p, q| p.iou(&b).total_cmp(&q.iou(&b)));
                found.push(better.unwrap_or(b));
            }
        }
        found
    }

    /// The smallest face a whole-frame search looks for, in frame pixels: `min_face` detector
    /// pixels at the frame's detection scale.
    fn min_face_in_frame(&self, w: u32) -> f32 {
        let dw = self.cfg.detect_width;
        let scale = if dw == 0 || w <= dw {
            1.0
        } else {
            w as f32 / dw as f32
        };
        self.cfg.min_face as f32 * scale
    }

    /// rustface on the whole frame, downscaled to `detect_width`.
    fn rustface_full(&mut self, gray: &[u8], w: u32, h: u32) -> Vec<FaceBox> {
        let dw = self.cfg.detect_width;
        if dw == 0 || w <= dw {
            return self.run(gray, w, h, self.cfg.min_face);
        }
        let scale = w as f32 / dw as f32;
        let dh = ((h as f32 / scale).round() as u32).max(1);
        let Some(img) = GrayImage::from_raw(w, h, gray.to_vec()) else {
            return Vec::new();
        };
        let small = image::imageops::resize(&img, dw, dh, FilterType::Triangle);
        self.run(small.as_raw(), dw, dh, self.cfg.min_face)
            .into_iter()
            .map(|b| b.scaled(scale))
            .collect()
    }

    /// Searches a region around `near` (roi_scale × its side) for the face that continues it;
    /// returns the detection that overlaps `near` most, if any.
    ///
    /// The region is scaled so that the tracked face is [`ROI_FACE`] px, and only faces from the
    /// detector's 40-px window up are searched (about 60% of the track's size to the region's
    /// 160%): the pyramid covers the sizes a face can reach by the next frame, not every size
    /// down to `min_face` (which the full-frame search still does, every `every` frames).
    pub fn detect_near(&mut self, gray: &[u8], w: u32, h: u32, near: &FaceBox) -> Option<FaceBox> {
        if gray.len() != (w * h) as usize || w == 0 || h == 0 {
            return None;
        }
        let found = match &self.blaze {
            Some(net) if self.cfg.near == NearDetector::BlazeFace => {
                blaze_near(net, gray, w, h, near, BLAZE_THRESHOLD)
            }
            _ => self.rustface_near(gray, w, h, near),
        };
        found
            .into_iter()
            .max_by(|a, b| a.iou(near).total_cmp(&b.iou(near)))
            .filter(|b| b.iou(near) > 0.1)
    }

    /// rustface's faces in the region around `near`, in frame pixels.
    fn rustface_near(&mut self, gray: &[u8], w: u32, h: u32, near: &FaceBox) -> Vec<FaceBox> {
        let side = near.w.max(near.h);
        let reach = side * self.cfg.roi_scale;
        let (cx, cy) = near.centre();
        let x0 = (cx - reach / 2.0).max(0.0).floor() as u32;
        let y0 = (cy - reach / 2.0).max(0.0).floor() as u32;
        let x1 = ((cx + reach / 2.0).ceil() as u32).min(w);
        let y1 = ((cy + reach / 2.0).ceil() as u32).min(h);
        if x1 <= x0 || y1 <= y0 {
            return Vec::new();
        }
        let (rw, rh) = (x1 - x0, y1 - y0);
        let mut roi = Vec::with_capacity((rw * rh) as usize);
        for y in y0..y1 {
            let row = (y * w) as usize;
            roi.extend_from_slice(&gray[row + x0 as usize..row + x1 as usize]);
        }
        // Downscale only: a small face is searched at its own size.
        let s = (side / ROI_FACE).max(1.0);
        let min_face = ((0.7 * side / s) as u32).clamp(self.cfg.min_face.min(40), 40);
        let found = if s > 1.0 {
            let (sw, sh) = (
                ((rw as f32 / s).round() as u32).max(1),
                ((rh as f32 / s).round() as u32).max(1),
            );
            let Some(img) = GrayImage::from_raw(rw, rh, roi) else {
                return Vec::new();
            };
            let small = image::imageops::resize(&img, sw, sh, FilterType::Triangle);
            self.run(small.as_raw(), sw, sh, min_face)
                .into_iter()
                .map(|b| b.scaled(rw as f32 / sw as f32))
                .collect()
        } else {
            self.run(&roi, rw, rh, min_face)
        };
        found
            .into_iter()
            .map(|b| FaceBox {
                x: b.x + x0 as f32,
                y: b.y + y0 as f32,
                ..b
            })
            .collect()
    }
}

/// Region searched by BlazeFace around a track, as a multiple of the track's side: the face
/// then spans about 40% of the network's input, well inside the sizes it was trained on.
const BLAZE_ROI: f32 = 2.0;
/// BlazeFace's score threshold around a track (MediaPipe's default for this model).
const BLAZE_THRESHOLD: f32 = 0.5;
/// BlazeFace's score threshold on a whole frame's tiles, where a frame offers many more chances
/// of a false face: on 400 PublicTest renders (`eval --through-pipeline --limit 400
/// --full-detector blazeface`), 0.5 found 98.8% with 17 false detections, 0.6 98.3% with 6,
/// 0.7 95.8% with 2.
const BLAZE_FULL_THRESHOLD: f32 = 0.6;
/// BlazeFace's box mapped to the square rustface's box (grown by the default crop margin)
/// frames: the face square FER2013's images were cut to, which the classifier learnt. Fitted on
/// PublicTest renders (`eval --through-pipeline --limit 600`: the crop's side over the true
/// side, its centre's offset, and the accuracy over the faces found): BlazeFace's side is 0.95
/// of the square's (0.93 framed them 2% wider and scored 62.7% against 63.9%), its centre
/// 0.075 of the side below the square's. (On the shared clips, against rustface's boxes: 0.89
/// and 0.12.)
const BLAZE_SIDE: f32 = 0.95;
const BLAZE_DROP: f32 = 0.075;

/// BlazeFace's faces in the region around `near`, as face squares in frame pixels.
fn blaze_near(
    net: &BlazeFace,
    gray: &[u8],
    w: u32,
    h: u32,
    near: &FaceBox,
    threshold: f32,
) -> Vec<FaceBox> {
    blaze_in_square(net, gray, w, h, region_around(near), threshold, false)
}

/// The square `(x0, y0, side)` BlazeFace searches around a face box: [`BLAZE_ROI`] times its
/// side, about its centre.
fn region_around(b: &FaceBox) -> (f32, f32, f32) {
    let side = b.w.max(b.h) * BLAZE_ROI;
    let (cx, cy) = b.centre();
    (cx - side / 2.0, cy - side / 2.0, side)
}

/// BlazeFace's faces in the square `(x0, y0, side)` of the frame (resampled to the network's
/// input, and shown to it mirrored when `mirrored`), as face squares in frame pixels
/// ([`BLAZE_SIDE`], [`BLAZE_DROP`]).
fn blaze_in_square(
    net: &BlazeFace,
    gray: &[u8],
    w: u32,
    h: u32,
    (x0, y0, side): (f32, f32, f32),
    threshold: f32,
    mirrored: bool,
) -> Vec<FaceBox> {
    let n = blazeface::INPUT;
    let mut img = sample_square(gray, w, h, x0, y0, side, n as u32);
    if mirrored {
        img.chunks_exact_mut(n).for_each(|row| row.reverse());
    }
    let s = side / n as f32;
    net.detect(&img, threshold)
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let mut sq = face_square(b);
            if mirrored {
                sq.x = n as f32 - sq.x - sq.w;
            }
            let sq = sq.scaled(s);
            FaceBox {
                x: sq.x + x0,
                y: sq.y + y0,
                ..sq
            }
        })
        .collect()
}

/// The face square BlazeFace's box `b` stands for ([`BLAZE_SIDE`], [`BLAZE_DROP`]), in the same
/// pixels, with its score and roll.
fn face_square(b: &FaceBox) -> FaceBox {
    let side = b.w.max(b.h) / BLAZE_SIDE;
    let (cx, cy) = b.centre();
    FaceBox {
        x: cx - side / 2.0,
        y: cy - BLAZE_DROP * side - side / 2.0,
        w: side,
        h: side,
        ..*b
    }
}

/// Whether BlazeFace, shown the region around a candidate face from the tiles (the face at
/// half the input) and that region mirrored, finds the face in both at
/// [`BLAZE_FULL_THRESHOLD`]: a face is a face in its mirror image too, which a tile's false
/// faces (a dark shirt, foliage) seldom are.
fn second_look(net: &BlazeFace, gray: &[u8], w: u32, h: u32, c: &FaceBox) -> bool {
    [false, true].into_iter().all(|mirrored| {
        blaze_in_square(
            net,
            gray,
            w,
            h,
            region_around(c),
            BLAZE_FULL_THRESHOLD,
            mirrored,
        )
        .iter()
        .any(|b| b.iou(c) >= SAME_FACE_IOU)
    })
}

/// Share of a tile's side taken by the smallest and the largest face a level of tiles is
/// searched for (BlazeFace short range was trained on faces of about a fifth of its input and
/// up; larger faces are the next level's).
const TILE_FACE_MIN: f32 = 0.2;
const TILE_FACE_MAX: f32 = 0.4;
/// Smallest face the tiles look for, in frame pixels (a tile of 200 px). Smaller faces are
/// rustface's (`FullDetector::Both`): tiles for them would cost quadratically more.
pub const TILE_MIN_FACE: f32 = 40.0;

/// The square tiles `(x0, y0, side)` a whole `w × h` frame is searched in by BlazeFace, for
/// faces of `min_face` frame pixels (at least [`TILE_MIN_FACE`]) and up: one square over the
/// whole frame (centred; the part outside repeats the edge), then levels of tiles from the
/// frame's short side, each half the last, down to one at most a quarter larger than the tile
/// in which `min_face` is [`TILE_FACE_MIN`] of the side. Within a level, tiles overlap so that every face of up to
/// [`TILE_FACE_MAX`] of the side lies wholly inside one.
pub fn tiles(w: u32, h: u32, min_face: f32) -> Vec<(f32, f32, f32)> {
    let (w, h) = (w as f32, h as f32);
    let long = w.max(h);
    let mut out = vec![((w - long) / 2.0, (h - long) / 2.0, long)];
    let smallest = min_face.max(TILE_MIN_FACE) / TILE_FACE_MIN;
    let mut side = w.min(h);
    loop {
        let stride = side * (1.0 - TILE_FACE_MAX);
        let starts = |len: f32| -> Vec<f32> {
            let n = ((len - side) / stride).ceil().max(0.0) as usize;
            (0..=n)
                .map(|i| (len - side) * i as f32 / n.max(1) as f32)
                .collect()
        };
        for y in starts(h) {
            for x in starts(w) {
                out.push((x, y, side));
            }
        }
        // A level within a quarter of the smallest tile is the last: its faces of 0.16-0.2 of
        // the side are still found (on 600 PublicTest renders, stopping at 240 px instead of
        // adding a 200-px level at 640x480 kept the faces found within one), and another level
        // would cost as much again.
        if side <= smallest * 1.25 {
            return out;
        }
        side = (side / 2.0).max(smallest);
    }
}

/// BlazeFace over the [`tiles`] of a whole frame: one box per face (the best-scoring where
/// tiles overlap), none smaller than `min_face`.
/// `between` runs before each tile.
fn blaze_full(
    net: &BlazeFace,
    gray: &[u8],
    w: u32,
    h: u32,
    min_face: f32,
    between: &mut dyn FnMut(),
) -> Vec<FaceBox> {
    let mut found: Vec<FaceBox> = tiles(w, h, min_face)
        .into_iter()
        .flat_map(|tile| {
            between();
            blaze_in_square(net, gray, w, h, tile, BLAZE_FULL_THRESHOLD, false)
        })
        // Faces a little under the smallest searched for are still faces (the search is
        // designed for `min_face`; a box's side varies by ±15% around the face's).
        .filter(|b| b.w >= 0.7 * min_face)
        .collect();
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    distinct(found)
}

/// The square `(x0, y0, side)` of the frame resampled bilinearly to `n × n`; outside the
/// frame, edge pixels repeat.
pub fn sample_square(gray: &[u8], w: u32, h: u32, x0: f32, y0: f32, side: f32, n: u32) -> Vec<u8> {
    let (w, h, n) = (w as usize, h as usize, n as usize);
    if gray.len() != w * h || w == 0 || h == 0 {
        return vec![0; n * n];
    }
    let step = side / n as f32;
    let mut out = Vec::with_capacity(n * n);
    for j in 0..n {
        let sy = y0 + (j as f32 + 0.5) * step - 0.5;
        for i in 0..n {
            let sx = x0 + (i as f32 + 0.5) * step - 0.5;
            out.push(super::crop::bilinear(gray, w, h, sx, sy).round() as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_samples_copy_at_scale_one_and_repeat_edges_outside() {
        let (w, h) = (8u32, 6u32);
        let gray: Vec<u8> = (0..w * h).map(|i| (i * 5) as u8).collect();
        // Side n at a whole-pixel origin: the pixels themselves.
        let s = sample_square(&gray, w, h, 2.0, 1.0, 4.0, 4);
        for (j, row) in s.chunks(4).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                assert_eq!(v, gray[(1 + j) * 8 + 2 + i], "{i},{j}");
            }
        }
        // Left of and above the frame: the corner pixel repeats.
        assert_eq!(
            sample_square(&gray, w, h, -10.0, -10.0, 4.0, 4),
            vec![gray[0]; 16]
        );
        // Half the resolution: each output is the mean of a 2x2 block (bilinear at its centre).
        let half = sample_square(&gray, w, h, 0.0, 0.0, 4.0, 2);
        let mean = (gray[0] as f32 + gray[1] as f32 + gray[8] as f32 + gray[9] as f32) / 4.0;
        assert_eq!(half[0], mean.round() as u8);
        // A buffer of the wrong size gives a blank square, not a panic.
        assert_eq!(
            sample_square(&gray[1..], w, h, 0.0, 0.0, 4.0, 3),
            vec![0; 9]
        );
    }

    #[test]
    fn config_is_validated_and_tiny_frames_have_no_faces() {
        assert!(DetectConfig {
            every: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(DetectConfig {
            detect_width: 10,
            ..Default::default()
        }
        .validate()
        .is_err());
        // rustface panics on a threshold <= 0: refused up front.
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = DetectConfig {
                score_threshold: t,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("--det-threshold"), "{e}");
        }
        let mut d = FaceDetector::new(DetectConfig::default()).unwrap();
        assert!(d.detect_full(&[0u8; 16], 4, 4).is_empty());
        assert!(d.detect_full(&[0u8; 10], 4, 4).is_empty());
    }
}
