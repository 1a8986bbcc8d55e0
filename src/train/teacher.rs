//! Distillation targets: a trained model's f_φ probabilities for every Training image, mixed
//! with the smoothed labels into the soft targets the student's cross-entropy uses.

use std::path::Path;

use candle_core::Device;

use super::config::DistillConfig;
use super::{Monitor, Stage};
use crate::config::ModelConfig;
use crate::data::{Dataset, FACE_PIXELS, FACE_SIZE};
use crate::error::{Error, Result};
use crate::infer::{Classifier, Tta};

/// Images per teacher forward pass (times its views).
const BATCH: usize = 64;

/// The teacher's probabilities for every image of one dataset, and the share they take of the
/// target.
pub(super) struct Teacher {
    probs: Vec<f32>,
    classes: usize,
    weight: f64,
}

impl Teacher {
    /// Runs the teacher of `d` (and each of `d.also`, averaging their probabilities) over
    /// every image of `data` (no augmentation, the views `d.tta`). Every teacher is loaded and
    /// checked before the first one's pass. The pass can take many minutes: it notes its
    /// progress about every tenth of each teacher's images, and `monitor.stop` ends it between
    /// batches with an error (nothing of the stage is written by it).
    pub fn compute(
        d: &DistillConfig,
        data: &Dataset,
        student: &ModelConfig,
        dev: &Device,
        monitor: &mut Monitor,
    ) -> Result<Self> {
        let models = d
            .teachers()
            .map(|dir| Self::load(dir, d.tta, student, dev))
            .collect::<Result<Vec<_>>>()?;
        let n = models.len();
        let each = models
            .iter()
            .enumerate()
            .map(|(i, clf)| {
                let which = match n {
                    1 => String::new(),
                    n => format!(" (model {} of {n})", i + 1),
                };
                Self::probs_of(clf, data, &which, monitor)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            probs: mean(each),
            classes: student.num_classes(),
            weight: d.weight,
        })
    }

    /// The teacher in `dir` under the views `tta`, if it fits the student's data.
    fn load(dir: &Path, tta: Tta, student: &ModelConfig, dev: &Device) -> Result<Classifier> {
        let mut clf = Classifier::load(dir, dev)?;
        if clf.config().classes != student.classes {
            return Err(Error::model(
                dir,
                "the teacher's classes differ from the training config's",
            ));
        }
        if clf.config().input.size != FACE_SIZE {
            return Err(Error::model(
                dir,
                format!(
                    "the teacher takes {0}x{0} inputs, the data is 48x48",
                    clf.config().input.size
                ),
            ));
        }
        clf.set_tta(tta)?;
        Ok(clf)
    }

    /// One teacher's f_φ probabilities `(images, C)` flat; `which` names the teacher in the
    /// progress notes.
    fn probs_of(
        clf: &Classifier,
        data: &Dataset,
        which: &str,
        monitor: &mut Monitor,
    ) -> Result<Vec<f32>> {
        let mut probs = Vec::with_capacity(data.len() * clf.config().num_classes());
        let total = data.len();
        let every = total.div_ceil(10);
        let (mut done, mut next_note) = (0, every);
        let doing = format!("during the teacher's answers{which}");
        for chunk in data.pixels.chunks(BATCH * FACE_PIXELS) {
            monitor.check_pass(Stage::Classifier, &doing, done, total)?;
            probs.extend(clf.fphi_probs(chunk)?);
            done += chunk.len() / FACE_PIXELS;
            if done >= next_note && done < total {
                (monitor.note)(&format!(
                    "classifier: the teacher's answers{which}: {done} of {total} images"
                ));
                next_note += every;
            }
        }
        Ok(probs)
    }

    /// Soft targets `(rows, C)` flat: `(1 − w) · base + w · teacher`, where `base` holds the
    /// rows' own targets.
    pub fn mix(&self, rows: &[usize], base: Vec<f32>) -> Vec<f32> {
        let c = self.classes;
        let mut t = base;
        for (i, &r) in rows.iter().enumerate() {
            let teacher = &self.probs[r * c..(r + 1) * c];
            for (t, &p) in t[i * c..(i + 1) * c].iter_mut().zip(teacher) {
                *t = ((1.0 - self.weight) * *t as f64 + self.weight * p as f64) as f32;
            }
        }
        t
    }
}

/// The element-wise mean of one or more equally long vectors.
fn mean(mut each: Vec<Vec<f32>>) -> Vec<f32> {
    let n = each.len() as f32;
    let mut sum = each.swap_remove(0);
    for one in &each {
        for (s, p) in sum.iter_mut().zip(one) {
            *s += p;
        }
    }
    sum.iter_mut().for_each(|s| *s /= n);
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::targets::smoothed_targets;

    fn targets(t: &Teacher, rows: &[usize], labels: &[u32], eps: f64) -> Vec<f32> {
        t.mix(rows, smoothed_targets(labels, t.classes, eps))
    }

    fn teacher(weight: f64) -> Teacher {
        // Three images, two classes.
        Teacher {
            probs: vec![0.9, 0.1, 0.3, 0.7, 0.5, 0.5],
            classes: 2,
            weight,
        }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    /// The teacher's pass notes its progress as it goes, and a stop ends it with an error that
    /// says nothing was kept.
    #[test]
    fn the_teachers_pass_says_how_far_it_is_and_stops_when_asked() {
        use std::sync::atomic::AtomicBool;
        let root = tempfile::tempdir().unwrap();
        let mut cfg = ModelConfig::default();
        cfg.encoder.widths = [8, 8, 16, 16];
        cfg.encoder.blocks = [1, 1, 1, 1];
        cfg.encoder.cbam_reduction = 4;
        cfg.card.hidden = 16;
        let dir = root.path().join("teacher");
        let (vm, _) = crate::model::init_model(&cfg, &Device::Cpu, 3).unwrap();
        crate::model::save_model_dir(&dir, &cfg, &vm).unwrap();
        let n = 200;
        let data = Dataset {
            pixels: (0..n * FACE_PIXELS).map(|i| (i * 7 % 251) as u8).collect(),
            labels: vec![0; n],
            splits: vec![0; n],
            ..Default::default()
        };
        let d = DistillConfig {
            tta: Tta::Flip,
            ..DistillConfig::new(dir.clone())
        };
        let run = |stop: bool| {
            let stop = AtomicBool::new(stop);
            let mut notes = Vec::new();
            let mut note = |s: &str| notes.push(s.to_string());
            let mut progress = |_: &crate::train::Progress| {};
            let mut monitor = Monitor {
                progress: &mut progress,
                note: &mut note,
                stop: &stop,
            };
            let got = Teacher::compute(&d, &data, &cfg, &Device::Cpu, &mut monitor);
            (got, notes)
        };
        let (got, notes) = run(false);
        let t = got.unwrap();
        assert_eq!(t.probs.len(), n * cfg.num_classes());
        // 64 images a batch: after 64, 128 and 192 of 200.
        assert_eq!(
            notes,
            [64, 128, 192].map(|k| format!("classifier: the teacher's answers: {k} of {n} images"))
        );
        let (got, _) = run(true);
        let e = got.err().expect("a stopped pass fails").to_string();
        assert!(
            e.contains("interrupted") && e.contains("0 of 200") && e.contains("--resume"),
            "{e}"
        );
    }

    #[test]
    fn an_ensemble_teacher_is_the_mean_of_its_models() {
        let one = vec![0.9, 0.1, 0.2, 0.8];
        assert_eq!(mean(vec![one.clone()]), one);
        let m = mean(vec![
            one,
            vec![0.5, 0.5, 0.6, 0.4],
            vec![0.1, 0.9, 0.4, 0.6],
        ]);
        assert!(close(&m, &[0.5, 0.5, 0.4, 0.6]), "{m:?}");
    }

    #[test]
    fn targets_mix_the_smoothed_label_with_the_teachers_row() {
        // Rows 2 and 0 of the data, labels 1 and 1, smoothing 0.2: smoothed [0.1, 0.9].
        let (rows, labels) = ([2, 0], [1, 1]);
        assert!(close(
            &targets(&teacher(0.0), &rows, &labels, 0.2),
            &[0.1, 0.9, 0.1, 0.9]
        ));
        assert!(close(
            &targets(&teacher(1.0), &rows, &labels, 0.2),
            &[0.5, 0.5, 0.9, 0.1]
        ));
        // 0.25 · teacher + 0.75 · smoothed.
        assert!(close(
            &targets(&teacher(0.25), &rows, &labels, 0.2),
            &[0.2, 0.8, 0.3, 0.7]
        ));
        for t in targets(&teacher(0.4), &[1, 2, 0], &[0, 1, 0], 0.1).chunks(2) {
            assert!((t[0] + t[1] - 1.0).abs() < 1e-6);
        }
    }
}
