//! A recipe's cycles (warm restarts of the supervised stage after `train all`'s CARD stage),
//! end to end on a tiny recipe and synthetic data, by one command: each cycle starts from the
//! model before it, a distilled one learns from that model, an averaged one's soup is the mean
//! of f_φ before and after and gets a CARD head of its own, and the last model is what the
//! recipe's `ship` section calibrates and exports. Run again with `--resume`, nothing is redone.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use fer_cam::config::{Stem, Tta};
use fer_cam::train::{CycleConfig, CycleDistill, ShipConfig, TrainConfig};

fn tiny_recipe(data: &Path, run: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::new(data.to_path_buf(), run.to_path_buf());
    cfg.model.encoder.stem = Stem::Conv7x7Pool;
    cfg.model.encoder.widths = [8, 16, 16, 32];
    cfg.model.encoder.blocks = [1, 1, 1, 1];
    cfg.model.encoder.cbam_reduction = 4;
    cfg.model.card.hidden = 16;
    cfg.model.card.samples = 4;
    cfg.ssl.projector = vec![32, 32];
    cfg.ssl.opt.batch_size = 16;
    cfg.classifier.opt.batch_size = 16;
    cfg.card.batch_size = 16;
    cfg.card.val_samples = 2;
    cfg.ssl.opt.epochs = 1;
    cfg.classifier.opt.epochs = 1;
    cfg.card.epochs = 1;
    let cycle = CycleConfig {
        classifier: cfg.classifier.clone(),
        card: cfg.card.clone(),
        distill: None,
        average: false,
    };
    cfg.cycles = vec![
        cycle.clone(),
        CycleConfig {
            distill: Some(CycleDistill {
                tta: Tta::Flip,
                weight: 0.6,
                also: Vec::new(),
            }),
            average: true,
            ..cycle
        },
    ];
    cfg.ship = Some(ShipConfig {
        tta: vec![Tta::None],
        weights: fer_cam::model::export::StoredWeights::F32,
    });
    cfg
}

fn train_all(recipe: &Path, data: &Path, run: &Path, resume: bool) -> std::process::Output {
    let mut cmd = Command::new(common::bin());
    cmd.args(["train", "all", "--no-cache", "--config"])
        .arg(recipe)
        .arg("--data")
        .arg(data)
        .arg("--run-dir")
        .arg(run);
    if resume {
        cmd.arg("--resume");
    }
    cmd.output().unwrap()
}

fn tensors(model: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let t = t.to_dtype(candle_core::DType::F32).unwrap();
                (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn train_all_runs_the_recipes_cycles_and_ships_the_last_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fer.csv");
    common::write_fer_csv(&data, 24);
    let run = tmp.path().join("run");
    let recipe = tmp.path().join("recipe.json");
    let cfg = tiny_recipe(&data, &run);
    std::fs::write(&recipe, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    assert_eq!(cfg.final_model(), run.join("soup3/card/model"));

    let o = train_all(&recipe, &data, &run, false);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    for dir in ["cycle2", "cycle3", "soup3"] {
        let model = run.join(dir).join("card/model");
        assert!(model.exists(), "{} missing\n{err}", model.display());
        assert!(out.contains(model.to_str().unwrap()), "{out}");
    }
    assert!(!run.join("soup2").exists(), "cycle 2 is not averaged");
    assert!(err.contains("cycle 2 of 2"), "{err}");
    // Each cycle started from the model before it; the distilled one learned from it.
    let config = |dir: &str| common::read_json(&run.join(dir).join("config.json"));
    let path = |p: &str| run.join(p).to_str().unwrap().to_string();
    assert_eq!(
        config("cycle2")["classifier"]["init"],
        path("classifier/model").as_str()
    );
    assert!(config("cycle2")["classifier"]["distill"].is_null());
    assert_eq!(
        config("cycle3")["classifier"]["init"],
        path("cycle2/classifier/model").as_str()
    );
    assert_eq!(
        config("cycle3")["classifier"]["distill"]["teacher"],
        path("cycle2/card/model").as_str()
    );
    // The soup is the mean of f_φ before and after cycle 3 (every tensor; the head too).
    let before = tensors(&run.join("cycle2/classifier/model"));
    let after = tensors(&run.join("cycle3/classifier/model"));
    let soup = tensors(&run.join("soup3/classifier/model"));
    assert_eq!(soup.len(), after.len());
    let mut differs = false;
    for ((s, a), b) in soup.iter().zip(&after).zip(&before) {
        assert_eq!(s.0, a.0);
        for ((&s, &a), &b) in s.1.iter().zip(&a.1).zip(&b.1) {
            assert!((s - 0.5 * (a + b)).abs() <= 1e-6 * (1.0 + a.abs() + b.abs()));
            differs |= a != b;
        }
    }
    assert!(differs, "cycle 3 changed nothing");
    // The shipped model is the soup's (f32 weights here: the same tensors, plus temperatures).
    let calibration = common::read_json(&run.join("ship/calibration-none.json"));
    assert_eq!(calibration["model"], path("soup3/card/model").as_str());
    let shipped = tensors(&run.join("ship/model"));
    assert_eq!(shipped, tensors(&run.join("soup3/card/model")));

    // Again, resumed: every stage is done, nothing is rewritten.
    let files = [
        "cycle3/card/model/model.safetensors",
        "soup3/card/model/model.safetensors",
        "ship/model/model.safetensors",
    ];
    let read = || -> Vec<Vec<u8>> {
        files
            .iter()
            .map(|f| std::fs::read(run.join(f)).unwrap())
            .collect()
    };
    let kept = read();
    let o = train_all(&recipe, &data, &run, true);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        out.matches("(all done in an earlier run)").count(),
        8,
        "ssl, classifier, card, 2 x (classifier, card), the soup's card:\n{out}"
    );
    assert!(kept == read(), "a resumed run rewrote a model");
    // Nothing only a stage's epochs need is computed again for a finished stage.
    for redone in [
        "the teacher's answers",
        "f_phi's features",
        "soup: the mean",
    ] {
        assert!(!err.contains(redone), "{redone:?} again:\n{err}");
    }
    assert_eq!(err.matches("done in an earlier run").count(), 8, "{err}");
}

/// A cycle starts from and learns from the model before it: a recipe that names its own start
/// or teacher in a cycle is refused before anything runs.
#[test]
fn a_cycle_that_names_its_own_start_or_teacher_is_refused() {
    let cfg = tiny_recipe(Path::new("d.csv"), Path::new("run"));
    cfg.validate().unwrap();
    let mut c = cfg.clone();
    c.cycles[0].classifier.init = Some("elsewhere".into());
    assert!(c.validate().unwrap_err().to_string().contains("cycles[0]"));
    let mut c = cfg.clone();
    c.cycles[1].classifier.distill = Some(fer_cam::train::DistillConfig::new("t".into()));
    assert!(c.validate().unwrap_err().to_string().contains("cycles[1]"));
    let mut c = cfg.clone();
    c.cycles[1].distill.as_mut().unwrap().weight = 1.5;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("cycles[1].distill.weight"));
    let mut c = cfg;
    c.cycles[0].card.epochs = 0;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("cycles[0].card"));
}
