//! The face stage: detection (rustface / SeetaFace on full frames, BlazeFace or rustface around
//! tracks), square crops at the classifier's input size, and a tracker that gives each face a
//! stable id across frames.

pub mod blazeface;
mod crop;
mod detect;
mod track;

pub use crop::{crop_box, crop_face, crop_square, crop_turn, ROLL_LEFT_UPRIGHT};
pub use detect::{sample_square, tiles, DetectConfig, FaceDetector, FullDetector, NearDetector};
pub use track::{Smoother, Tracker, TrackerConfig};

/// Two detections overlapping by this IoU or more are one face.
pub const SAME_FACE_IOU: f32 = 0.3;

/// The detections that are not the same face as an earlier one ([`SAME_FACE_IOU`]), in order:
/// earlier ones win (put the best first). The searches around two tracks, a late full-frame
/// search or overlapping tiles can find one face twice, and two tracks would then follow it.
pub fn distinct(dets: Vec<FaceBox>) -> Vec<FaceBox> {
    let mut kept: Vec<FaceBox> = Vec::with_capacity(dets.len());
    for d in dets {
        if kept.iter().all(|k| k.iou(&d) < SAME_FACE_IOU) {
            kept.push(d);
        }
    }
    kept
}

/// A face box in source pixels, with the detector's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaceBox {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    pub score: f64,
    /// In-plane head roll in radians, when the detector gave eye positions: the angle of the
    /// line from the eye on the image's left to the one on its right, clockwise in the image
    /// (y down). The crop is turned by it so the eyes come out level.
    pub roll: Option<f32>,
}

impl FaceBox {
    /// Intersection over union.
    pub fn iou(&self, o: &FaceBox) -> f32 {
        let x0 = self.x.max(o.x);
        let y0 = self.y.max(o.y);
        let x1 = (self.x + self.w).min(o.x + o.w);
        let y1 = (self.y + self.h).min(o.y + o.h);
        let inter = (x1 - x0).max(0.0) * (y1 - y0).max(0.0);
        let union = self.w * self.h + o.w * o.h - inter;
        if union <= 0.0 {
            0.0
        } else {
            inter / union
        }
    }

    /// The box with coordinates multiplied by `s` (from a downscaled image back to the frame).
    pub fn scaled(&self, s: f32) -> FaceBox {
        FaceBox {
            x: self.x * s,
            y: self.y * s,
            w: self.w * s,
            h: self.h * s,
            score: self.score,
            roll: self.roll,
        }
    }

    /// Centre point.
    pub fn centre(&self) -> (f32, f32) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }
}
