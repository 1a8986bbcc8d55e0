//! A prediction ensemble, measured: several models' answers on a FER+-labelled split, each
//! alone and averaged (f_φ's probabilities, the CARD samples' mean probabilities and their vote
//! shares), scored by FER+ majority accuracy. Flip views, one sampler seed; every model must
//! have FER+'s eight classes. docs/models.md ("A prediction ensemble") has the numbers.
//!
//! `cargo run --release --example ensemble_probe -- fer2013.csv.gz ferplus_labels.csv SPLIT SEED
//! MODEL...` (MODEL: a built-in name or a model directory)
use anyhow::{bail, Context};
use candle_core::Device;
use fer_cam::config::Tta;
use fer_cam::data::{ferplus, load, LoadOptions, FACE_SIZE};
use fer_cam::model::embedded;
use fer_cam::{metrics, Classifier};
use std::path::Path;

const USAGE: &str = "usage: ensemble_probe fer2013.csv.gz ferplus_labels.csv SPLIT SEED MODEL...";

/// What each model says of every image, `images · classes` values each.
#[derive(Default)]
struct Answers {
    fphi: Vec<f32>,
    card_probs: Vec<f32>,
    votes: Vec<f32>,
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 5 {
        bail!(USAGE);
    }
    let (all, _) = load(Path::new(&a[0]), &LoadOptions::with_default_cache())?;
    let (all, _) = ferplus::relabel(&all, Path::new(&a[1]), true)?;
    let ds = all.select_split(&a[2])?;
    let seed: u64 = a[3].parse().context("SEED")?;
    let classes = ds.class_names.len();
    let px = FACE_SIZE * FACE_SIZE;
    let mut members = Vec::new();
    for name in &a[4..] {
        let mut clf = match embedded::named(Path::new(name)) {
            Some(builtin) => Classifier::load_builtin(&builtin, &Device::Cpu)?,
            None => Classifier::load(Path::new(name), &Device::Cpu)?,
        };
        if clf.config().classes != ds.class_names {
            bail!(
                "{name}: classes {:?}, the labels' {:?}",
                clf.config().classes,
                ds.class_names
            );
        }
        clf.set_tta(Tta::Flip)?;
        clf.set_sampler(fer_cam::infer::SamplerConfig {
            seed,
            ..clf.sampler()
        })?;
        let mut m = Answers::default();
        for batch in ds.pixels.chunks(64 * px) {
            for p in clf.predict(batch)? {
                m.fphi.extend(&p.fphi_probs);
                m.card_probs.extend(&p.card.probs);
                m.votes.extend(&p.card.votes);
            }
        }
        println!(
            "{name}: f_phi {:.2}%, mean sample probabilities {:.2}%, vote {:.2}%",
            accuracy(&m.fphi, &ds.labels, classes),
            accuracy(&m.card_probs, &ds.labels, classes),
            accuracy(&m.votes, &ds.labels, classes)
        );
        members.push(m);
    }
    let mean = |pick: fn(&Answers) -> &Vec<f32>| -> Vec<f32> {
        let n = members.len() as f32;
        (0..ds.labels.len() * classes)
            .map(|j| members.iter().map(|m| pick(m)[j]).sum::<f32>() / n)
            .collect()
    };
    println!(
        "the mean of {} models: f_phi {:.2}%, mean sample probabilities {:.2}%, vote shares {:.2}%",
        members.len(),
        accuracy(&mean(|m| &m.fphi), &ds.labels, classes),
        accuracy(&mean(|m| &m.card_probs), &ds.labels, classes),
        accuracy(&mean(|m| &m.votes), &ds.labels, classes)
    );
    Ok(())
}

/// Percent of rows (`classes` scores each) whose largest score is at the label.
fn accuracy(scores: &[f32], labels: &[u8], classes: usize) -> f64 {
    let pred: Vec<usize> = scores.chunks_exact(classes).map(metrics::argmax).collect();
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    100.0 * metrics::accuracy(&pred, &labels)
}
