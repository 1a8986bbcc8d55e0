//! The model directory format: round trip, and clear one-line errors for every kind of bad file.

use std::path::Path;

use candle_core::Device;
use fer_cam::config::{ModelConfig, Stem};
use fer_cam::model::{init_model, load_model_dir, save_model_dir, CONFIG_FILE, WEIGHTS_FILE};
use fer_cam::Classifier;

fn small(cbam: bool) -> ModelConfig {
    let mut cfg = ModelConfig::default();
    cfg.encoder.stem = Stem::Conv7x7Pool;
    cfg.encoder.cbam = cbam;
    cfg.encoder.widths = [8, 8, 16, 16];
    cfg.encoder.blocks = [1, 1, 1, 1];
    cfg.encoder.cbam_reduction = 4;
    cfg.card.hidden = 16;
    cfg.card.samples = 8;
    cfg
}

fn save(dir: &Path, cfg: &ModelConfig) {
    let (vm, _) = init_model(cfg, &Device::Cpu, 3).unwrap();
    save_model_dir(dir, cfg, &vm).unwrap();
}

fn load_err(dir: &Path) -> String {
    let msg = match load_model_dir(dir, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    };
    assert_eq!(msg.lines().count(), 1, "one line please: {msg}");
    msg
}

#[test]
fn round_trip_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let mut cfg = small(true);
    cfg.input.tta = fer_cam::config::Tta::Flip;
    save(&dir, &cfg);
    // Saving again over an existing directory replaces it and leaves no temp files behind.
    save(&dir, &cfg);
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let loaded = load_model_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.config, cfg);
    let mut clf = Classifier::load(&dir, &Device::Cpu).unwrap();
    // The config's test-time views are the classifier's default.
    assert_eq!(clf.tta(), fer_cam::config::Tta::Flip);
    let crops = vec![128u8; 3 * 48 * 48];
    let preds = clf.predict(&crops).unwrap();
    assert_eq!(preds.len(), 3);
    for p in &preds {
        assert_eq!(p.card.probs.len(), 7);
        assert!((p.card.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!((p.card.votes.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(p.card.label < 7);
        assert!(p.card.entropy >= 0.0 && p.card.entropy <= (7f32).ln() + 1e-4);
        assert_eq!(p.card.certain, p.card.p_value < 0.05);
    }
    // Identical crops with the same model: same f_phi output.
    assert_eq!(preds[0].fphi_probs, preds[2].fphi_probs);
    assert!(clf.predict(&crops[..100]).is_err());
}

#[test]
fn samples_do_not_depend_on_batching() {
    // The daemon batches whatever faces are waiting, so a face's noise must not depend on its
    // batch: faces classified one at a time match the same faces classified together.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save(&dir, &small(true));
    let crops: Vec<u8> = (0..3 * 48 * 48).map(|i| (i * 7 % 251) as u8).collect();
    let mut together = Classifier::load(&dir, &Device::Cpu).unwrap();
    let all = together.predict(&crops).unwrap();
    let mut alone = Classifier::load(&dir, &Device::Cpu).unwrap();
    for (i, want) in all.iter().enumerate() {
        let got = alone.predict(&crops[i * 2304..(i + 1) * 2304]).unwrap();
        assert_eq!(got[0].card.votes, want.card.votes, "face {i}");
        for (a, b) in got[0].card.probs.iter().zip(&want.card.probs) {
            assert!((a - b).abs() < 1e-5, "face {i}: {a} vs {b}");
        }
    }
    // The next face gets new noise: the same crop again gives other samples.
    let again = together.predict(&crops[..2304]).unwrap();
    assert_ne!(again[0].card.probs, all[0].card.probs);
}

#[test]
fn corrupt_truncated_and_mismatched_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    save(&dir, &small(true));
    let cfg_path = dir.join(CONFIG_FILE);
    let w_path = dir.join(WEIGHTS_FILE);
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let good_w = std::fs::read(&w_path).unwrap();

    std::fs::write(&cfg_path, "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("not a valid model config"),
        "{e}"
    );

    std::fs::write(
        &cfg_path,
        good_cfg.replace("\"format_version\": 1", "\"format_version\": 9"),
    )
    .unwrap();
    assert!(load_err(&dir).contains("format_version 9"));

    std::fs::write(&cfg_path, &good_cfg).unwrap();
    std::fs::write(&w_path, &good_w[..good_w.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    std::fs::write(&w_path, b"garbage").unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));

    std::fs::remove_file(&w_path).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));

    // Weights with CBAM, config without: unexpected tensors.
    std::fs::write(&w_path, &good_w).unwrap();
    let mut no_cbam = small(false);
    std::fs::write(&cfg_path, serde_json::to_string(&no_cbam).unwrap()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("unexpected tensor") && e.contains("cbam"), "{e}");

    // Config wants CBAM, weights lack it: a missing tensor.
    save(&dir, &no_cbam);
    std::fs::write(&cfg_path, serde_json::to_string(&small(true)).unwrap()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("weights do not match"), "{e}");

    // Same names, other shapes (wider encoder in the config).
    no_cbam.encoder.widths = [8, 8, 16, 32];
    save(&dir, &small(false));
    std::fs::write(&cfg_path, serde_json::to_string(&no_cbam).unwrap()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("weights do not match") && e.contains("shape"),
        "{e}"
    );

    // Class count differs.
    let mut five = small(false);
    five.classes.truncate(5);
    std::fs::write(&cfg_path, serde_json::to_string(&five).unwrap()).unwrap();
    assert!(load_err(&dir).contains("weights do not match"));

    assert!(load_err(&tmp.path().join("absent")).contains("config.json"));
}

#[test]
fn non_finite_weights_negative_variances_and_special_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let cfg = small(true);
    save(&dir, &cfg);
    let w_path = dir.join(WEIGHTS_FILE);
    let good = candle_core::safetensors::load(&w_path, &Device::Cpu).unwrap();
    let with = |name: &str, value: f32| {
        let mut t = good.clone();
        let old = &t[name];
        let mut v = old.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = value;
        t.insert(
            name.to_string(),
            candle_core::Tensor::from_vec(v, old.dims(), &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&t, &w_path).unwrap();
    };
    let var = good
        .keys()
        .find(|k| k.ends_with("running_var"))
        .unwrap()
        .clone();
    let weight = good.keys().find(|k| k.ends_with("weight")).unwrap().clone();
    for (name, value, want) in [
        (&weight, f32::NAN, "NaN"),
        (&weight, f32::INFINITY, "inf"),
        (&var, -1.0, "negative variance"),
    ] {
        with(name, value);
        let e = load_err(&dir);
        assert!(e.contains(name.as_str()) && e.contains(want), "{e}");
    }
    // Not regular files: refused before reading (a FIFO would block, /dev/zero never ends).
    std::fs::remove_file(&w_path).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &w_path).unwrap();
    assert!(load_err(&dir).contains("not a regular file"));
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::remove_file(&cfg_path).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(&cfg_path)
        .status()
        .unwrap();
    assert!(fifo.success());
    assert!(load_err(&dir).contains("not a regular file"));
    // In-range values that would need gigabytes: refused from the config alone.
    std::fs::remove_file(&cfg_path).unwrap();
    let mut huge = cfg.clone();
    huge.card.hidden = 65536;
    huge.card.timesteps = 10000;
    huge.card.steps = 10;
    std::fs::write(&cfg_path, serde_json::to_string(&huge).unwrap()).unwrap();
    assert!(load_err(&dir).contains("M parameters"));
}
