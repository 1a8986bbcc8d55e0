//! The trained model that ships in `models/fer2013/` and is compiled into the binary: it loads
//! from the binary with no `--model`, it is the committed one, and it still scores what its model
//! card says on real images (so a broken weight format or a swapped file fails here).

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use fer_cam::model::embedded;

/// PublicTest accuracy of the CARD vote on the first 500 images must reach this. The shipped
/// model scores 67.2% there (seed 0, its flip views); the floor leaves room for sampler noise
/// (another seed or sample count moves the full PublicTest score by about a point), while a
/// broken weight format or an untrained model (near 25%) falls far below it.
const FLOOR_FIRST_500: f64 = 0.61;

fn models_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fer2013")
}

#[test]
fn embedded_model_is_the_committed_one_and_calibrated() {
    let dir = models_dir();
    let (embedded_config, embedded_weights) =
        embedded::files().expect("this build embeds no model: models/fer2013 is missing");
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        weights == embedded_weights,
        "the binary embeds other weights than models/fer2013"
    );
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert_eq!(config, embedded_config);
    let loaded = embedded::load(&Device::Cpu).unwrap();
    assert_eq!(loaded.config.classes, fer_cam::config::FER2013_CLASSES);
    // `fer-cam calibrate` fitted the temperatures (the default 1.0 means it was never applied),
    // and the model carries the calibration file's temperatures and the test-time views they
    // were fitted under.
    assert_ne!(loaded.config.card.temperature, 1.0);
    let calibration = Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/fer2013.json");
    let cal = fer_cam::calibrate::read_calibration(&calibration).unwrap();
    assert_eq!(loaded.config.card.temperatures(), cal.temperatures);
    assert_eq!(loaded.config.input.tta, cal.tta);
    // Every calibration file under calibration/ is in the model, under its views.
    let mut files = 0;
    for e in std::fs::read_dir(calibration.parent().unwrap()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let c = fer_cam::calibrate::read_calibration(&p).unwrap();
            assert_eq!(
                loaded.config.temperatures_for(c.tta),
                c.temperatures,
                "{}",
                p.display()
            );
            files += 1;
        }
    }
    // The default views' file, plus one per other set of views the model carries.
    assert_eq!(files, 1 + loaded.config.card.calibrated.len());
    assert!(
        weights.len() <= 25_000_000,
        "shipped model is {} bytes",
        weights.len()
    );
    // Stored as f16 (export --weights f16): the header names F16 tensors.
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&weights[8..8 + header_len]).unwrap();
    assert!(header.contains("\"F16\""));
}

/// The recipe set beside the model (`scripts/ship-model.sh`'s input) builds the architecture
/// that ships, and names its first teacher by a full git revision.
#[test]
fn recipes_build_the_shipped_architecture() {
    let dir = models_dir();
    let loaded = embedded::load(&Device::Cpu).unwrap();
    let mut recipes = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("recipe") && name.ends_with(".json")) {
            continue;
        }
        let cfg: fer_cam::train::TrainConfig =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.model.encoder, loaded.config.encoder, "{name}");
        assert_eq!(cfg.model.classes, loaded.config.classes, "{name}");
        recipes += 1;
    }
    assert!(recipes >= 2, "{recipes} recipes in {}", dir.display());
    if let Ok(rev) = std::fs::read_to_string(dir.join("teacher.rev")) {
        let rev = rev.trim();
        assert!(
            rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()),
            "teacher.rev: {rev:?}"
        );
    }
}

/// `run` with no `--model` works from a directory with no `models/` beside the binary.
#[test]
fn run_without_model_uses_the_embedded_one() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("gray.png");
    image::GrayImage::from_pixel(64, 48, image::Luma([128u8]))
        .save(&img)
        .unwrap();
    let out = Command::new(common::bin())
        .current_dir(tmp.path())
        .args(["run", "--input", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.lines().any(|l| l.contains("\"type\":\"summary\"")));
}

#[test]
fn embedded_model_scores_above_its_floor_on_public_test() {
    let Some(shared) = common::shared_dir() else {
        common::skip_loudly(
            "embedded_model_scores_above_its_floor_on_public_test",
            Path::new("../shared"),
        );
        return;
    };
    let data = shared.join("data/fer2013/fer2013.csv.gz");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("r.json");
    let out = Command::new(common::bin())
        .env("FER_CAM_CACHE", tmp.path().join("cache"))
        .args([
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--split",
            "PublicTest",
            "--limit",
            "500",
            "--json",
            json.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["images"], 500);
    assert_eq!(r["model"], embedded::NAME);
    let acc = r["accuracy"].as_f64().unwrap();
    assert!(
        acc >= FLOOR_FIRST_500,
        "embedded model: {acc:.4} on the first 500 PublicTest images, floor {FLOOR_FIRST_500}"
    );
}
