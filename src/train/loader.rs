//! The data loader: a thread that shuffles, augments and normalises batches ahead of the compute
//! through a bounded queue. Order and augmentation are derived from (seed, stage, epoch, batch),
//! so an epoch is the same whether it runs in one go or after a resume.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::config::InputConfig;
use crate::data::augment::{Augment, Webcam};
use crate::data::{Dataset, FACE_PIXELS};

/// One batch: `views` normalised image buffers of `len · 48 · 48` floats, the labels, and the
/// dataset rows the images came from.
pub struct Batch {
    pub views: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
    pub rows: Vec<usize>,
    /// The mixup this batch's images went through (their targets must go through it too).
    pub mix: Option<Mix>,
}

/// A batch's mixup: image `i` became `λ·image i + (1 − λ)·image partner[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    pub lambda: f32,
    pub partner: Vec<usize>,
}

impl Mix {
    /// Draws λ from Beta(α, α) and a shuffled partner for each of `n` images.
    fn draw(alpha: f64, n: usize, rng: &mut impl Rng) -> Self {
        let lambda = rand_distr::Beta::new(alpha, alpha)
            .map(|b| rng.sample(b))
            .unwrap_or(1.0) as f32;
        let mut partner: Vec<usize> = (0..n).collect();
        partner.shuffle(rng);
        Self { lambda, partner }
    }

    /// Blends rows of `width` values of `x` (`n · width`) with their partners' rows.
    pub fn apply(&self, x: &[f32], width: usize) -> Vec<f32> {
        let (l, m) = (self.lambda, 1.0 - self.lambda);
        x.chunks_exact(width)
            .zip(&self.partner)
            .flat_map(|(row, &p)| {
                let other = &x[p * width..(p + 1) * width];
                row.iter().zip(other).map(move |(&a, &b)| l * a + m * b)
            })
            .collect()
    }
}

impl Batch {
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.labels.len()
    }
}

pub use crate::rngs::mix_seed;

/// What one epoch's loader produces.
#[derive(Clone)]
pub struct EpochPlan {
    pub data: Arc<Dataset>,
    pub batch_size: usize,
    pub augment: Augment,
    /// Augmented views per image (2 for Barlow Twins).
    pub views: usize,
    pub seed: u64,
    /// How each view's gray levels become the network's input.
    pub input: InputConfig,
    /// Label each image with a class drawn from its vote distribution (where the data has one).
    pub draw_labels: bool,
    /// Mixup's Beta(α, α) parameter (0: no mixup); see [`Mix`].
    pub mixup: f64,
    /// With conditions, each of the `views` augmented views also goes through them: the batch
    /// then holds `2 · views` views, view `views + v` being view `v` so changed (stability
    /// training's pairs).
    pub perturb: Option<Webcam>,
}

impl EpochPlan {
    /// Full batches per epoch (a last batch smaller than 2 would break batch-norm and is dropped;
    /// other short batches are kept).
    pub fn batches(&self) -> usize {
        let n = self.data.len();
        let full = n / self.batch_size;
        let rest = n % self.batch_size;
        full + usize::from(rest >= 2)
    }

    fn build(&self, order: &[usize], batch: usize) -> Batch {
        let lo = batch * self.batch_size;
        let hi = (lo + self.batch_size).min(order.len());
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix_seed(&[self.seed, batch as u64]));
        let total = self.views * if self.perturb.is_some() { 2 } else { 1 };
        let mut views = vec![Vec::with_capacity((hi - lo) * FACE_PIXELS); total];
        let mut labels = Vec::with_capacity(hi - lo);
        let normalise = |view: &mut Vec<f32>, px: &[u8]| self.input.normalise_into(px, view);
        for &i in &order[lo..hi] {
            let img = self.data.image(i);
            for v in 0..self.views {
                let aug = self.augment.apply(img, &mut rng);
                if let Some(w) = &self.perturb {
                    normalise(&mut views[self.views + v], &w.apply_to(&aug, &mut rng));
                }
                normalise(&mut views[v], &aug);
            }
            labels.push(if self.draw_labels {
                super::targets::draw_label(&self.data, i, rng.random::<f32>())
            } else {
                self.data.labels[i] as u32
            });
        }
        let mut mix = None;
        if self.mixup > 0.0 && labels.len() >= 2 {
            let m = Mix::draw(self.mixup, labels.len(), &mut rng);
            views = views.iter().map(|v| m.apply(v, FACE_PIXELS)).collect();
            mix = Some(m);
        }
        Batch {
            views,
            labels,
            rows: order[lo..hi].to_vec(),
            mix,
        }
    }

    /// Starts a loader thread for this epoch; batches arrive in order through a queue of
    /// `depth` slots. Dropping the receiver stops the thread.
    pub fn spawn(self, depth: usize) -> std::io::Result<(Receiver<Batch>, JoinHandle<()>)> {
        let (tx, rx) = bounded(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("fer-loader".into())
            .spawn(move || {
                let mut order: Vec<usize> = (0..self.data.len()).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
                order.shuffle(&mut rng);
                for b in 0..self.batches() {
                    if tx.send(self.build(&order, b)).is_err() {
                        return;
                    }
                }
            })?;
        Ok((rx, handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed normalisation with mean 0 and sd 1: each input is its gray level over 255.
    fn raw_input() -> InputConfig {
        InputConfig {
            mean: 0.0,
            std: 1.0,
            ..InputConfig::default()
        }
    }

    fn tiny(n: usize) -> Arc<Dataset> {
        Arc::new(Dataset {
            class_names: vec!["a".into(), "b".into()],
            split_names: vec!["Training".into()],
            pixels: (0..n * FACE_PIXELS)
                .map(|i| (i / FACE_PIXELS) as u8)
                .collect(),
            labels: (0..n).map(|i| (i % 2) as u8).collect(),
            splits: vec![0; n],
            ..Default::default()
        })
    }

    #[test]
    fn epochs_are_reproducible_and_cover_the_data() {
        let plan = EpochPlan {
            data: tiny(10),
            batch_size: 4,
            augment: Augment::none(),
            views: 2,
            seed: 7,
            input: raw_input(),
            draw_labels: false,
            mixup: 0.0,
            perturb: None,
        };
        assert_eq!(plan.batches(), 3);
        let collect = |p: EpochPlan| -> Vec<(Vec<f32>, Vec<u32>)> {
            let (rx, h) = p.spawn(2).unwrap();
            let v = rx.iter().map(|b| (b.views[1].clone(), b.labels)).collect();
            h.join().unwrap();
            v
        };
        let a = collect(plan.clone());
        assert_eq!(a, collect(plan.clone()));
        let mut firsts: Vec<u32> = a
            .iter()
            .flat_map(|(v, _)| v.chunks(FACE_PIXELS).map(|c| (c[0] * 255.0).round() as u32))
            .collect();
        firsts.sort();
        assert_eq!(firsts, (0..10).collect::<Vec<u32>>());
        let other = EpochPlan { seed: 8, ..plan };
        assert_ne!(a, collect(other));
        // A batch of one image is dropped (batch-norm needs two).
        let p = EpochPlan {
            data: tiny(9),
            batch_size: 4,
            augment: Augment::none(),
            views: 1,
            seed: 1,
            input: raw_input(),
            draw_labels: false,
            mixup: 0.0,
            perturb: None,
        };
        assert_eq!(p.batches(), 2);
    }

    #[test]
    fn a_perturbed_batch_pairs_each_view_with_its_changed_copy() {
        let plan = EpochPlan {
            data: tiny(8),
            batch_size: 4,
            augment: Augment::supervised(),
            views: 1,
            seed: 5,
            input: raw_input(),
            draw_labels: false,
            mixup: 0.0,
            perturb: None,
        };
        let order: Vec<usize> = (0..8).collect();
        let plain = plan.build(&order, 1);
        assert_eq!(plain.views.len(), 1);
        // Gamma only: the copy is each view with its gray levels bent, pixel by pixel.
        let gamma = Webcam {
            gamma_lo: 2.0,
            gamma_hi: 2.0,
            ..Webcam::default()
        };
        let paired = EpochPlan {
            perturb: Some(gamma),
            ..plan
        }
        .build(&order, 1);
        assert_eq!(paired.views.len(), 2);
        assert_eq!(paired.labels, plain.labels);
        assert_eq!(paired.rows, plain.rows);
        assert_eq!(paired.views[0].len(), paired.views[1].len());
        let mut bent = 0;
        for (&v, &c) in paired.views[0].iter().zip(&paired.views[1]) {
            let want = (255.0 * v.powi(2)).round() / 255.0;
            assert!((c - want).abs() < 1e-6, "{v} -> {c}, not {want}");
            bent += usize::from(c != v);
        }
        assert!(bent > 0);
    }

    #[test]
    fn mixup_blends_images_and_targets_with_the_same_partner_and_lambda() {
        let m = Mix {
            lambda: 0.75,
            partner: vec![1, 0, 2],
        };
        // Rows of width 2: [0, 4], [8, 0], [1, 1].
        let x = [0.0, 4.0, 8.0, 0.0, 1.0, 1.0];
        assert_eq!(m.apply(&x, 2), [2.0, 3.0, 6.0, 1.0, 1.0, 1.0]);
        // Targets that sum to one still do.
        let t = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5];
        let mixed = m.apply(&t, 2);
        assert_eq!(mixed, [0.75, 0.25, 0.25, 0.75, 0.5, 0.5]);

        let plan = EpochPlan {
            data: tiny(8),
            batch_size: 4,
            augment: Augment::none(),
            views: 1,
            seed: 3,
            input: raw_input(),
            draw_labels: false,
            mixup: 0.4,
            perturb: None,
        };
        let order: Vec<usize> = (0..8).collect();
        let b = plan.build(&order, 1);
        let m = b.mix.clone().expect("mixup asked for");
        assert!((0.0..=1.0).contains(&m.lambda));
        let mut sorted = m.partner.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3]);
        // Image i of rows 4..8 (each image one constant value, its row / 255) is the blend.
        for (i, img) in b.views[0].chunks(FACE_PIXELS).enumerate() {
            let want =
                (m.lambda * (4 + i) as f32 + (1.0 - m.lambda) * (4 + m.partner[i]) as f32) / 255.0;
            assert!(img.iter().all(|&v| (v - want).abs() < 1e-5), "{i}");
        }
        // The same batch again: the same draw; without mixup, none.
        assert_eq!(plan.build(&order, 1).mix, Some(m));
        let plain = EpochPlan { mixup: 0.0, ..plan };
        assert!(plain.build(&order, 1).mix.is_none());
    }
}
