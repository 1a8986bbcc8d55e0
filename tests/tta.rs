//! Test-time views (`--tta`): flip averages f_φ over the crop and its mirror image and pools
//! CARD's samples across both, faces stay independent of their batch, and the sample count
//! rounds up to whole samples per view. Run on the shipped model, whose outputs do depend on
//! which way a face looks.

mod common;

use candle_core::Device;
use common::max_diff;
use fer_cam::infer::{Classifier, SamplerConfig, Tta};
use rand::{Rng, SeedableRng};

const SIDE: usize = 48;
const PX: usize = SIDE * SIDE;

/// `n` seeded crops: a left-to-right ramp (so a mirror image differs) plus noise.
fn crops(n: usize, seed: u64) -> Vec<u8> {
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n * PX)
        .map(|i| ((i % SIDE) * 4 + g.random_range(0..64usize)).min(255) as u8)
        .collect()
}

fn mirrored(crops: &[u8]) -> Vec<u8> {
    crops
        .chunks_exact(SIDE)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

fn classifier(tta: Tta, samples: usize) -> Classifier {
    let mut c = Classifier::load_embedded(&Device::Cpu).expect("embedded model");
    c.set_tta(tta).unwrap();
    let steps = c.sampler().steps;
    c.set_sampler(SamplerConfig {
        samples,
        steps,
        seed: 3,
    })
    .unwrap();
    c
}

#[test]
fn flip_averages_f_phi_over_the_crop_and_its_mirror() {
    let n = 3;
    let x = crops(n, 1);
    let both = [x.clone(), mirrored(&x)].concat();
    let plain = classifier(Tta::None, 8).predict(&both).unwrap();
    let flip = classifier(Tta::Flip, 8).predict(&x).unwrap();
    let flip_of_mirror = classifier(Tta::Flip, 8).predict(&mirrored(&x)).unwrap();
    for i in 0..n {
        let (a, b) = (&plain[i].fphi_probs, &plain[n + i].fphi_probs);
        // Otherwise a wrong "mirror" (none at all, or a vertical flip) could pass.
        assert!(
            max_diff(a, b) > 1e-3,
            "face {i}: the mirror changes nothing"
        );
        let mean: Vec<f32> = a.iter().zip(b).map(|(p, q)| (p + q) / 2.0).collect();
        assert!(max_diff(&flip[i].fphi_probs, &mean) < 1e-5, "face {i}");
        // The two views of the mirror image are those of the crop.
        assert!(max_diff(&flip_of_mirror[i].fphi_probs, &flip[i].fphi_probs) < 1e-5);
    }
}

#[test]
fn samples_are_pooled_across_views_in_whole_samples_per_view() {
    assert_eq!(Tta::None.samples_per_face(5), 5);
    assert_eq!(Tta::Flip.samples_per_face(5), 6);
    assert_eq!(Tta::TenCrop.samples_per_face(32), 40);
    for (tta, asked, drawn) in [(Tta::Flip, 5, 6), (Tta::TenCrop, 12, 20)] {
        let mut c = classifier(tta, asked);
        assert_eq!(c.samples_per_face(), drawn);
        for p in c.predict(&crops(2, 2)).unwrap() {
            // Every vote share is a whole number of the samples drawn.
            let total: f32 = p.card.votes.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{:?}", p.card.votes);
            for v in &p.card.votes {
                let k = v * drawn as f32;
                assert!((k - k.round()).abs() < 1e-3, "{tta:?}: {:?}", p.card.votes);
            }
        }
        let y0 = c.sample_y0(&crops(2, 2)).unwrap();
        assert_eq!(y0.len(), 2 * drawn * c.config().num_classes());
    }
}

#[test]
fn faces_under_views_do_not_depend_on_batching() {
    let x = crops(3, 4);
    let all = classifier(Tta::Flip, 8).predict(&x).unwrap();
    let mut alone = classifier(Tta::Flip, 8);
    for (i, want) in all.iter().enumerate() {
        let got = alone.predict(&x[i * PX..(i + 1) * PX]).unwrap();
        assert_eq!(got[0].card.votes, want.card.votes, "face {i}");
        assert!(max_diff(&got[0].card.probs, &want.card.probs) < 1e-5);
    }
}

#[test]
fn each_set_of_views_uses_the_temperatures_calibrated_under_it() {
    use fer_cam::config::Temperatures;
    let base = Classifier::load_embedded(&Device::Cpu).expect("embedded model");
    let mut cfg = base.config().clone();
    let ten = Temperatures {
        sample: 0.05,
        output: 3.0,
    };
    cfg.card.calibrated.insert(Tta::TenCrop, ten);
    cfg.card.calibrated.remove(&Tta::None);
    let mut clf = Classifier::new(cfg.clone(), base.model().clone(), Device::Cpu).unwrap();
    let x = crops(2, 5);
    let run = |clf: &mut Classifier, tta| {
        clf.set_tta(tta).unwrap();
        (clf.temperatures(), clf.predict(&x).unwrap())
    };
    // Views calibrated: their temperatures, and the probabilities follow them.
    let (t, calibrated) = run(&mut clf, Tta::TenCrop);
    assert_eq!(t, ten);
    // Views not calibrated: the model's default temperatures.
    let (t, _) = run(&mut clf, Tta::None);
    assert_eq!(t, cfg.card.temperatures());
    // The same model with the default temperatures under ten-crop reports other probabilities.
    cfg.card.calibrated.remove(&Tta::TenCrop);
    let mut plain = Classifier::new(cfg.clone(), base.model().clone(), Device::Cpu).unwrap();
    let (t, default) = run(&mut plain, Tta::TenCrop);
    assert_eq!(t, cfg.card.temperatures());
    assert!(max_diff(&calibrated[0].card.probs, &default[0].card.probs) > 1e-3);
}
