//! `scripts/ship-model.sh`, the recipe that builds the shipped model, end to end on tiny recipes
//! and synthetic data: `train all`, plain cycles, distilled cycles that are averaged with the
//! model they started from (SOUP_FROM on) and that the next cycle starts from, the calibrations
//! and the export; a second run skips every finished stage. The first distilled cycle's teacher
//! comes from TEACHER, from the git revision in the recipe set's `teacher.rev`, or else is the
//! cycle before it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fer_cam::config::Stem;
use fer_cam::train::{DistillConfig, TrainConfig};

fn write_recipe(path: &Path, cfg: &TrainConfig) {
    std::fs::write(path, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
}

fn ship(recipes: &Path, data: &Path, run: &Path, teacher: Option<&Path>) -> std::process::Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("bash");
    cmd.arg(repo.join("scripts/ship-model.sh"))
        .arg(data)
        .arg(run)
        .env("RECIPES", recipes)
        .env("SOUP_FROM", "3")
        .env("FER_CAM_BIN", common::bin())
        .env("FER_CAM_CACHE", run.join("cache"))
        .env_remove("TEACHER");
    if let Some(t) = teacher {
        cmd.env("TEACHER", t);
    }
    cmd.output().unwrap()
}

/// A tiny recipe set in `recipes`: recipe.json, then recipe-cycleN.json for each N in `cycles`,
/// distilled from cycle `distill_from` on.
fn write_recipes(recipes: &Path, data: &Path, cycles: &[u32], distill_from: u32) {
    std::fs::create_dir_all(recipes).unwrap();
    let mut cfg = TrainConfig::new(data.to_path_buf(), recipes.join("unused"));
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
    for &n in cycles {
        // The teacher path is the script's to set.
        cfg.classifier.distill =
            (n >= distill_from).then(|| DistillConfig::new("set-by-the-script".into()));
        write_recipe(&recipes.join(format!("recipe-cycle{n}.json")), &cfg);
    }
}

/// A temporary directory with synthetic FER2013 data (`fer.csv`) and a tiny recipe set
/// (`recipes/`, see `write_recipes`).
fn synthetic_data_and_recipes(
    cycles: &[u32],
    distill_from: u32,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fer.csv");
    common::write_fer_csv(&data, 24);
    let recipes = tmp.path().join("recipes");
    write_recipes(&recipes, &data, cycles, distill_from);
    (tmp, data, recipes)
}

/// A tiny untrained model (`fer-cam init`) in `dir`.
fn init_model(dir: &Path) {
    let o = Command::new(common::bin())
        .args(["init", "--stem", "conv7x7_pool", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn config(dir: &Path) -> serde_json::Value {
    json(&dir.join("config.json"))
}

/// The teacher a run's `dir` recorded in its config (`classifier.distill.teacher`).
fn teacher_of(run: &Path, dir: &str) -> serde_json::Value {
    config(&run.join(dir))["classifier"]["distill"]["teacher"].clone()
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn ship_script_runs_every_stage_in_order_and_skips_them_when_run_again() {
    let (tmp, data, recipes) = synthetic_data_and_recipes(&[2, 3, 4], 3);
    // The recipe set names its first teacher by a git revision; the files are gone from the
    // working tree since, as the built-in model's are when a new one replaces it.
    let teacher = tmp.path().join("teacher");
    init_model(&teacher);
    git(&recipes, &["init", "-q"]);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(teacher.join(f), recipes.join(f)).unwrap();
    }
    git(&recipes, &["add", "config.json", "model.safetensors"]);
    git(&recipes, &["commit", "-q", "-m", "teacher"]);
    let rev = git(&recipes, &["rev-parse", "HEAD"]);
    git(&recipes, &["rm", "-q", "config.json", "model.safetensors"]);
    std::fs::write(recipes.join("teacher.rev"), format!("{rev}\n")).unwrap();

    let run = tmp.path().join("run");
    let o = ship(&recipes, &data, &run, None);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let path = |p: &str| run.join(p).to_str().unwrap().to_string();
    // Each cycle started from the model before it; the first distilled one learned from the
    // revision's model, the next from the model before it.
    assert_eq!(teacher_of(&run, "cycle3"), path("teacher").as_str());
    for f in ["config.json", "model.safetensors"] {
        let extracted = std::fs::read(run.join("teacher").join(f)).unwrap();
        assert_eq!(extracted, std::fs::read(teacher.join(f)).unwrap(), "{f}");
    }
    assert_eq!(
        teacher_of(&run, "cycle4"),
        path("soup3/card/model").as_str()
    );
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
    let o = ship(&recipes, &data, &run, None);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("train "), "a stage ran again:\n{err}");
    let after = modified(&exported);
    assert_eq!(before, after);
}

#[test]
fn ship_script_takes_the_first_teacher_from_the_environment_then_the_cycle_before() {
    let (tmp, data, recipes) = synthetic_data_and_recipes(&[2, 3], 2);
    let teacher = tmp.path().join("teacher");
    init_model(&teacher);
    let run = tmp.path().join("run");
    let o = ship(&recipes, &data, &run, Some(&teacher));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert_eq!(teacher_of(&run, "cycle2"), teacher.to_str().unwrap());
    let prev = run.join("cycle2/card/model");
    assert_eq!(teacher_of(&run, "cycle3"), prev.to_str().unwrap());
    assert!(!run.join("teacher").exists());
}
