//! Face tracks: greedy IoU association of each frame's detections with live tracks. Ids start at
//! 1, increase, and are never reused. [`Smoother`] keeps an optional per-track moving average of
//! the class probabilities.

use std::collections::HashMap;

use super::FaceBox;

/// Tracker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackerConfig {
    /// Least IoU for a detection to continue a track.
    pub iou_threshold: f32,
    /// A track not seen for this many frames ends.
    pub max_missed: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            iou_threshold: 0.3,
            max_missed: 10,
        }
    }
}

#[derive(Debug, Clone)]
struct Track {
    id: u64,
    bbox: FaceBox,
    missed: u32,
}

/// Assigns stable ids to detections.
#[derive(Debug, Clone)]
pub struct Tracker {
    cfg: TrackerConfig,
    next_id: u64,
    tracks: Vec<Track>,
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Self {
        Self {
            cfg,
            next_id: 1,
            tracks: Vec::new(),
        }
    }

    /// Ends every track (a cut to an unrelated picture); ids are still never reused.
    pub fn forget(&mut self) {
        self.tracks.clear();
    }

    /// Live tracks' boxes (id, box), for searching near them between full detections.
    pub fn live(&self) -> Vec<(u64, FaceBox)> {
        self.tracks.iter().map(|t| (t.id, t.bbox)).collect()
    }

    /// Associates this frame's detections; returns (id, box) for each detection, in input order.
    pub fn update(&mut self, dets: &[FaceBox]) -> Vec<(u64, FaceBox)> {
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (di, d) in dets.iter().enumerate() {
            for (ti, t) in self.tracks.iter().enumerate() {
                let iou = d.iou(&t.bbox);
                if iou >= self.cfg.iou_threshold {
                    pairs.push((iou, di, ti));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut det_track = vec![None; dets.len()];
        let mut used = vec![false; self.tracks.len()];
        for (_, di, ti) in pairs {
            if det_track[di].is_none() && !used[ti] {
                det_track[di] = Some(ti);
                used[ti] = true;
            }
        }
        for (ti, t) in self.tracks.iter_mut().enumerate() {
            if !used[ti] {
                t.missed += 1;
            }
        }
        let mut out = Vec::with_capacity(dets.len());
        for (di, d) in dets.iter().enumerate() {
            let id = match det_track[di] {
                Some(ti) => {
                    let t = &mut self.tracks[ti];
                    t.bbox = *d;
                    t.missed = 0;
                    t.id
                }
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.tracks.push(Track {
                        id,
                        bbox: *d,
                        missed: 0,
                    });
                    id
                }
            };
            out.push((id, *d));
        }
        let max_missed = self.cfg.max_missed;
        self.tracks.retain(|t| t.missed <= max_missed);
        out
    }
}

/// Exponential moving average of probabilities per track id.
#[derive(Debug, Clone)]
pub struct Smoother {
    /// Weight of the newest value (1.0: no smoothing).
    alpha: f32,
    state: HashMap<u64, (Vec<f32>, u64)>,
}

impl Smoother {
    pub fn new(alpha: f32) -> Self {
        Self {
            alpha,
            state: HashMap::new(),
        }
    }

    /// Blends `probs` of track `id` seen at frame `seq`; tracks unseen for 300 frames are
    /// forgotten.
    pub fn smooth(&mut self, id: u64, seq: u64, probs: &[f32]) -> Vec<f32> {
        if self.alpha >= 1.0 {
            return probs.to_vec();
        }
        let a = self.alpha;
        let next: Vec<f32> = match self.state.get(&id) {
            Some((prev, _)) if prev.len() == probs.len() => prev
                .iter()
                .zip(probs)
                .map(|(p, q)| (1.0 - a) * p + a * q)
                .collect(),
            _ => probs.to_vec(),
        };
        self.state.insert(id, (next.clone(), seq));
        self.state
            .retain(|_, (_, last)| seq.saturating_sub(*last) < 300);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: f32) -> FaceBox {
        FaceBox {
            x,
            y: 10.0,
            w: 40.0,
            h: 40.0,
            score: 3.0,
            roll: None,
        }
    }

    #[test]
    fn ids_are_stable_and_never_reused() {
        let mut t = Tracker::new(TrackerConfig {
            max_missed: 1,
            ..Default::default()
        });
        let a = t.update(&[b(0.0), b(200.0)]);
        assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        // Moved a little, order swapped: ids follow the faces.
        let a = t.update(&[b(205.0), b(4.0)]);
        assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 1]);
        // Face 2 disappears for two frames: its track ends; a new face there gets a new id.
        t.update(&[b(8.0)]);
        t.update(&[b(10.0)]);
        let a = t.update(&[b(10.0), b(205.0)]);
        assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn smoothing_blends() {
        let mut s = Smoother::new(0.5);
        assert_eq!(s.smooth(1, 0, &[1.0, 0.0]), vec![1.0, 0.0]);
        assert_eq!(s.smooth(1, 1, &[0.0, 1.0]), vec![0.5, 0.5]);
        assert_eq!(s.smooth(2, 1, &[0.2, 0.8]), vec![0.2, 0.8]);
        let mut off = Smoother::new(1.0);
        off.smooth(1, 0, &[1.0, 0.0]);
        assert_eq!(off.smooth(1, 1, &[0.0, 1.0]), vec![0.0, 1.0]);
    }
}
