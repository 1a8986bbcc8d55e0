//! `scripts/ship-model.sh`, the recipe that builds the shipped model, end to end on tiny recipes
//! and synthetic data: `train all`, plain cycles, distilled cycles that are averaged with the
//! model they started from (SOUP_FROM on) and that the next cycle starts from, the calibrations
//! and the export; a second run skips every finished stage.

mod common;

use std::path::Path;
use std::process::Command;

use fer_cam::config::Stem;
use fer_cam::train::{DistillConfig, TrainConfig};

fn write_recipe(path: &Path, cfg: &TrainConfig) {
    std::fs::write(path, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
}

fn ship(repo: &Path, recipes: &Path, data: &Path, run: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(repo.join("scripts/ship-model.sh"))
        .arg(data)
        .arg(run)
        .env("RECIPES", recipes)
        .env("SOUP_FROM", "3")
        .env("FER_CAM_BIN", common::bin())
        .env("FER_CAM_CACHE", run.join("cache"))
        .output()
        .unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn config(dir: &Path) -> serde_json::Value {
    json(&dir.join("config.json"))
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn ship_script_runs_every_stage_in_order_and_skips_them_when_run_again() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fer.csv");
    common::write_fer_csv(&data, 24);
    let recipes = tmp.path().join("recipes");
    std::fs::create_dir_all(&recipes).unwrap();
    let mut cfg = TrainConfig::new(data.clone(), tmp.path().join("unused"));
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
    for epochs in [
        &mut cfg.ssl.opt.epochs,
        &mut cfg.classifier.opt.epochs,
        &mut cfg.card.epochs,
    ] {
        *epochs = 1;
    }
    write_recipe(&recipes.join("recipe.json"), &cfg);
    write_recipe(&recipes.join("recipe-cycle2.json"), &cfg);
    // Distilled from cycle 3 on (the teacher path is the script's to set).
    cfg.classifier.distill = Some(DistillConfig::new("set-by-the-script".into()));
    for n in [3, 4] {
        write_recipe(&recipes.join(format!("recipe-cycle{n}.json")), &cfg);
    }

    let run = tmp.path().join("run");
    let o = ship(repo, &recipes, &data, &run);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let path = |p: &str| run.join(p).to_str().unwrap().to_string();
    // Each cycle started from the model before it and learned from it where distilled.
    let teacher = |dir: &str| config(&run.join(dir))["classifier"]["distill"]["teacher"].clone();
    assert_eq!(teacher("cycle3"), path("cycle2/card/model").as_str());
    assert_eq!(teacher("cycle4"), path("soup3/card/model").as_str());
    assert!(config(&run.join("cycle2"))["classifier"]["distill"].is_null());
    // Cycles before SOUP_FROM got a head of their own; from it on the soups did, and the last
    // soup is what was calibrated and exported.
    for done in [
        "base/done-all",
        "cycle2/done-card",
        "soup3/done-card",
        "soup4/done-card",
        "calibration/fer2013.json",
        "calibration/fer2013-none.json",
        "calibration/fer2013-ten-crop.json",
        "export/model.safetensors",
    ] {
        assert!(run.join(done).exists(), "{done} missing\n{err}");
    }
    for not_done in ["cycle3/card", "cycle4/card", "soup2"] {
        assert!(!run.join(not_done).exists(), "{not_done}\n{err}");
    }
    let calibration = json(&run.join("calibration/fer2013.json"));
    assert_eq!(calibration["model"], path("soup4/card/model").as_str());
    fer_cam::model::load_model_dir(&run.join("export"), &candle_core::Device::Cpu).unwrap();

    // Again: nothing left to do, nothing rewritten.
    let exported = run.join("export/model.safetensors");
    let before = modified(&exported);
    let o = ship(repo, &recipes, &data, &run);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("train "), "a stage ran again:\n{err}");
    let after = modified(&exported);
    assert_eq!(before, after);
}
