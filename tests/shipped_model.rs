//! The trained models that ship in `models/<name>/` and are compiled into the binary: each loads
//! from the binary by name, is the committed one, is calibrated, and still gives the pinned
//! number of right answers on a fixed set of real images (so a broken weight format, a swapped
//! file or a changed sampler fails here).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use fer_cam::model::embedded;

/// Each built-in model's right answers on the first 500 rows of FER2013's Training split (a
/// split no choice is made on), `(name, CARD vote, f_φ)`, as measured by `eval --split Training
/// --limit 500` (FER+ majority labels for `ferplus`) on the AVX-512, AVX2 and portable kernels alike.
/// The run is deterministic; [`PIN_TOLERANCE`] allows for other kernels' rounding.
const PINNED_TRAINING_500: [(&str, u64, u64); 2] = [("fer2013", 402, 412), ("ferplus", 460, 460)];

/// Images either count may differ by (sums in another order on other instruction sets).
const PIN_TOLERANCE: u64 = 3;

fn models_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

/// The built-in models this checkout ships (a directory under `models/` for each name).
fn shipped() -> Vec<&'static str> {
    embedded::NAMES
        .iter()
        .copied()
        .filter(|n| models_dir(n).join("model.safetensors").is_file())
        .collect()
}

#[test]
fn embedded_models_are_the_committed_ones_and_calibrated() {
    assert!(shipped().contains(&"fer2013"), "models/fer2013 is missing");
    for name in shipped() {
        check_embedded(name);
    }
}

fn check_embedded(name: &str) {
    let dir = models_dir(name);
    let (embedded_config, embedded_weights) =
        embedded::files(name).unwrap_or_else(|| panic!("this build does not embed models/{name}"));
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        weights == embedded_weights,
        "the binary embeds other weights than models/{name}"
    );
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert_eq!(config, embedded_config);
    let loaded = embedded::load(name, &Device::Cpu).unwrap();
    if name == "fer2013" {
        assert_eq!(loaded.config.classes, fer_cam::config::FER2013_CLASSES);
    } else {
        assert_eq!(
            loaded.config.classes,
            fer_cam::data::ferplus::FERPLUS_CLASSES
        );
    }
    // `fer-cam calibrate` fitted the temperatures (the default 1.0 means it was never applied),
    // and the model carries the calibration file's temperatures and the test-time views they
    // were fitted under.
    assert_ne!(loaded.config.card.temperature, 1.0);
    let cal_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration");
    let calibration = cal_dir.join(format!("{name}.json"));
    let cal = fer_cam::calibrate::read_calibration(&calibration).unwrap();
    assert_eq!(loaded.config.card.temperatures(), cal.temperatures);
    assert_eq!(loaded.config.input.tta, cal.tta);
    // Every calibration file of this model under calibration/ (`NAME.json`, `NAME-VIEWS.json`)
    // is in the model, under its views.
    let mut files = 0;
    for e in std::fs::read_dir(&cal_dir).unwrap() {
        let p = e.unwrap().path();
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        let ours = stem == name || stem.starts_with(&format!("{name}-"));
        if ours && p.extension().is_some_and(|x| x == "json") {
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
    assert_eq!(files, 1 + loaded.config.card.calibrated.len(), "{name}");
    assert!(
        weights.len() <= 25_000_000,
        "{name} is {} bytes",
        weights.len()
    );
    // Stored as f16 (export --weights f16): the header names F16 tensors.
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&weights[8..8 + header_len]).unwrap();
    assert!(header.contains("\"F16\""), "{name}");
}

/// `--model NAME` loads the built-in model of that name; an unknown name that is no directory
/// either is a one-line error naming the built-in names.
#[test]
fn built_in_models_are_chosen_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("gray.png");
    image::GrayImage::from_pixel(64, 48, image::Luma([128u8]))
        .save(&img)
        .unwrap();
    for name in shipped() {
        let out = Command::new(common::bin())
            .current_dir(tmp.path())
            .args(["run", "--model", name, "--input", img.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = common::stdout_of_success(out);
        assert!(stdout.contains("\"type\":\"summary\""), "{name}");
    }
    let out = Command::new(common::bin())
        .current_dir(tmp.path())
        .args([
            "run",
            "--model",
            "builtin:nope",
            "--input",
            img.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built-in names: fer2013, ferplus"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The recipes beside each model build the architecture that ships, and name a first teacher,
/// where they have one, by a full git revision.
#[test]
fn recipes_build_the_shipped_architecture() {
    for name in shipped() {
        let dir = models_dir(name);
        let loaded = embedded::load(name, &Device::Cpu).unwrap();
        let mut recipes = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let file = p.file_name().unwrap().to_string_lossy().to_string();
            if !(file.starts_with("recipe") && file.ends_with(".json")) {
                continue;
            }
            let cfg: fer_cam::train::TrainConfig =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.model.encoder, loaded.config.encoder, "{name}/{file}");
            assert_eq!(cfg.model.classes, loaded.config.classes, "{name}/{file}");
            recipes += 1;
        }
        assert!(recipes >= 1, "no recipe in {}", dir.display());
        if let Ok(rev) = std::fs::read_to_string(dir.join("teacher.rev")) {
            let rev = rev.trim();
            assert!(
                rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()),
                "teacher.rev: {rev:?}"
            );
        }
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
    let stdout = common::stdout_of_success(out);
    assert!(stdout.lines().any(|l| l.contains("\"type\":\"summary\"")));
}

#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn embedded_models_give_their_pinned_counts() {
    let Some(shared) = common::shared_dir() else {
        common::skip_loudly(
            "embedded_models_give_their_pinned_counts",
            Path::new("../shared"),
        );
        return;
    };
    let data = shared.join("data/fer2013/fer2013.csv.gz");
    let votes = shared.join("data/fer2013/ferplus_labels.csv");
    let tmp = tempfile::tempdir().unwrap();
    for name in shipped() {
        let json = tmp.path().join(format!("{name}.json"));
        let mut cmd = Command::new(common::bin());
        cmd.env("FER_CAM_CACHE", tmp.path().join("cache")).args([
            "eval",
            "--model",
            name,
            "--data",
            data.to_str().unwrap(),
            "--split",
            "Training",
            "--limit",
            "500",
            "--json",
            json.to_str().unwrap(),
            "--quiet",
        ]);
        if name == "ferplus" {
            cmd.args(["--labels", votes.to_str().unwrap()]);
        }
        common::stdout_of_success(cmd.output().unwrap());
        let r = common::read_json(&json);
        assert_eq!(r["images"], 500);
        // FER+'s votes also mark the rows of Barsoum et al.'s stricter majority protocol, and
        // those are scored apart; FER2013's own labels have no such rows.
        if name == "ferplus" {
            assert_eq!(r["barsoum_majority"]["images"], 460, "{r}");
            assert!(
                r["barsoum_majority"]["accuracy"].as_f64().unwrap() > 0.5,
                "{r}"
            );
        } else {
            assert!(r.get("barsoum_majority").is_none(), "{r}");
        }
        assert_eq!(r["model"], embedded::display_name(name));
        let (_, card, fphi) = PINNED_TRAINING_500
            .iter()
            .find(|(n, ..)| *n == name)
            .unwrap_or_else(|| panic!("{name}: no pinned counts"));
        let count = |key: &str| (r[key].as_f64().unwrap() * 500.0).round() as u64;
        for (what, got, want) in [
            ("CARD", count("accuracy"), *card),
            ("f_phi", count("fphi_accuracy"), *fphi),
        ] {
            assert!(
                got.abs_diff(want) <= PIN_TOLERANCE,
                "{name}: {what} right on {got} of the first 500 Training images, pinned {want} ± {PIN_TOLERANCE}"
            );
        }
    }
}
