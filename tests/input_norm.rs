//! A model's `input.norm`: per crop, a face seen darker and with less contrast (a camera's lower
//! gain) gets the answer it gets as it was; with fixed normalisation it does not.

mod common;

use candle_core::Device;
use common::max_diff;
use fer_cam::config::Norm;
use fer_cam::infer::Classifier;
use rand::{Rng, SeedableRng};

const PX: usize = 48 * 48;

fn classifier(norm: Norm) -> Classifier {
    let base = Classifier::load_embedded(&Device::Cpu).expect("embedded model");
    let mut cfg = base.config().clone();
    cfg.input.norm = norm;
    Classifier::new(cfg, base.model().clone(), Device::Cpu).unwrap()
}

#[test]
fn per_crop_normalisation_answers_a_dimmed_face_as_the_face() {
    let mut g = rand::rngs::StdRng::seed_from_u64(9);
    // Even gray levels, so half of each (plus 20) is exact: the dimmed crop's per-crop input is
    // the crop's own up to float rounding.
    let faces: Vec<u8> = (0..3 * PX)
        .map(|i| (2 * ((i % 48) * 2 + g.random_range(0..30usize))) as u8)
        .collect();
    let dim: Vec<u8> = faces.iter().map(|&v| v / 2 + 20).collect();
    for (norm, same) in [(Norm::PerCrop, true), (Norm::Fixed, false)] {
        // A fresh classifier each time: its sampler's noise runs on from call to call.
        let answer = |crops: &[u8]| classifier(norm).predict(crops).unwrap();
        let (a, b) = (answer(&faces), answer(&dim));
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            let d = max_diff(&p.fphi_probs, &q.fphi_probs);
            if same {
                assert!(d < 1e-4, "{norm:?} face {i}: f_phi moved by {d}");
                assert_eq!(p.card.votes, q.card.votes, "{norm:?} face {i}");
            } else {
                assert!(d > 1e-3, "{norm:?} face {i}: dimming changed nothing");
            }
        }
    }
}
