//! The `fer-cam` binary end to end: init, eval, data, and its error and exit-code behaviour.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .args(args)
        .env(
            "FER_CAM_CACHE",
            std::env::temp_dir().join("fer-cam-test-cache"),
        )
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn init_fast_model(dir: &Path) {
    let o = run(&[
        "init",
        "--out",
        dir.to_str().unwrap(),
        "--stem",
        "conv7x7_pool",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `fer-cam eval` of `model` on `csv` (8 samples, 4 steps, batches of 7, `extra` flags) with its
/// JSON report written to `json`: stdout and the report.
fn eval_json(model: &Path, csv: &Path, json: &Path, extra: &[&str]) -> (String, serde_json::Value) {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        csv.to_str().unwrap(),
        "--samples",
        "8",
        "--steps",
        "4",
        "--batch-size",
        "7",
        "--json",
        json.to_str().unwrap(),
        "--no-cache",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (String::from_utf8(o.stdout).unwrap(), report)
}

#[test]
fn init_then_eval_writes_report_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_fast_model(&model);
    let csv = tmp.path().join("fer.csv");
    common::write_fer_csv(&csv, 20);
    let json = tmp.path().join("report.json");
    let (out, r) = eval_json(&model, &csv, &json, &["--split", "PrivateTest"]);
    for want in [
        "accuracy (CARD majority vote)",
        "PAvPU (t-test",
        "confusion matrix",
        "images/s",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert_eq!(r["images"], 20);
    assert_eq!(r["samples"], 8);
    assert_eq!(r["steps"], 4);
    let acc = r["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let total: u64 = r["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 20);
    // Random images: none repeats a Training image, so all are unseen and the line is left out.
    assert_eq!(r["unseen"]["images"], 20);
    assert!(!out.contains("no Training image repeats"), "{out}");
    // Same seed, same report numbers.
    let (_, r2) = eval_json(&model, &csv, &tmp.path().join("report2.json"), &[]);
    assert_eq!(r["accuracy"], r2["accuracy"]);
    assert_eq!(r["pavpu_ttest"], r2["pavpu_ttest"]);
    // Half-precision weights by default; f32 on request, and the report says which. (The
    // untrained model's probabilities are near uniform; these only move by rounding.)
    assert_eq!(r["weights"], "f16");
    let json3 = tmp.path().join("report3.json");
    let (out, r3) = eval_json(&model, &csv, &json3, &["--weights", "f32"]);
    assert!(out.contains("(f32 weights)"), "{out}");
    assert_eq!(r3["weights"], "f32");
    let (nll16, nll32) = (r["nll"].as_f64().unwrap(), r3["nll"].as_f64().unwrap());
    assert!(
        (nll16 - nll32).abs() < 1e-2 * nll32,
        "nll {nll16} vs {nll32}"
    );
    // Ten-crop test-time augmentation runs and says so.
    let o = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        csv.to_str().unwrap(),
        "--samples",
        "10",
        "--tta",
        "ten-crop",
        "--no-cache",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ten-crop TTA"));
}

#[test]
fn eval_scores_apart_the_test_images_that_repeat_training_images() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_fast_model(&model);
    let csv = tmp.path().join("fer.csv");
    common::write_fer_csv(&csv, 5);
    // Two more PrivateTest rows with the pixels of the first two Training rows (seeds 1 and 2).
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str(&common::csv_row(3, "PrivateTest", 1));
    text.push_str(&common::csv_row(0, "PrivateTest", 2));
    std::fs::write(&csv, text).unwrap();
    let json = tmp.path().join("r.json");
    let (out, r) = eval_json(&model, &csv, &json, &["--split", "PrivateTest"]);
    assert_eq!(r["images"], 7);
    assert_eq!(r["unseen"]["images"], 5);
    assert!(
        out.contains("images no Training image repeats (5 of 7"),
        "{out}"
    );
}

#[test]
fn bad_input_gives_one_line_errors_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_fast_model(&model);
    let csv = tmp.path().join("fer.csv");
    common::write_fer_csv(&csv, 3);
    let m = model.to_str().unwrap();
    let d = csv.to_str().unwrap();
    // A path of this test's own, so the case does not depend on what /tmp holds.
    let fresh = tmp.path().join("fresh-model");
    let fresh = fresh.to_str().unwrap();
    let cal = tmp.path().join("cal.json");
    let cal = cal.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--steps",
                "11",
                "--no-cache",
            ],
            "steps 11",
        ),
        (
            vec![
                "calibrate",
                "--model",
                m,
                "--data",
                d,
                "--bins",
                "18446744073709551615",
                "--out",
                cal,
                "--no-cache",
            ],
            "--bins 1..=1000",
        ),
        (
            vec![
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--samples",
                "0",
                "--no-cache",
            ],
            "samples 0",
        ),
        (
            vec![
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--split",
                "dev",
                "--no-cache",
            ],
            "split \"dev\"",
        ),
        (
            vec![
                "eval",
                "--model",
                m,
                "--data",
                "/nonexistent.csv",
                "--no-cache",
            ],
            "/nonexistent.csv",
        ),
        (
            vec!["eval", "--model", "/nonexistent", "--data", d],
            "config.json",
        ),
        (
            vec!["eval", "--model", m, "--data", d, "--device", "tpu"],
            "--device \"tpu\"",
        ),
        (
            vec!["eval", "--model", m, "--data", d, "--device", "cpu:1"],
            "allowed: cpu, cuda, cuda:N",
        ),
        (
            vec!["eval", "--model", m, "--data", d, "--device", "cuda:first"],
            "the GPU number must be a whole number",
        ),
        #[cfg(not(feature = "cuda"))]
        (
            vec!["eval", "--model", m, "--data", d, "--device", "cuda:1"],
            "this build has no CUDA support (build with --features cuda)",
        ),
        (vec!["init", "--out", m], "already exists"),
        (
            vec!["init", "--out", fresh, "--stem", "conv5x5"],
            "stem \"conv5x5\"",
        ),
    ];
    for (args, want) in cases {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        let last = e.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(want),
            "{args:?}: {e}"
        );
        assert!(o.stdout.is_empty());
    }
    // A corrupt dataset row: file and line.
    std::fs::write(&csv, "emotion,pixels,Usage\n3,1 2 3,Training\n").unwrap();
    let o = run(&["data", "--data", d, "--no-cache"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("fer.csv:2: expected 2304 pixels"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn closed_stdout_is_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("fer.csv");
    common::write_fer_csv(&csv, 3);
    let mut child = Command::new(common::bin())
        .args(["data", "--data", csv.to_str().unwrap(), "--no-cache"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A freshly initialised model over real PrivateTest images runs to completion at chance level.
#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn untrained_model_on_real_private_test_is_near_chance() {
    let Some(shared) = common::shared_dir() else {
        common::skip_loudly(
            "untrained_model_on_real_private_test_is_near_chance",
            Path::new("../shared"),
        );
        return;
    };
    let data = shared.join("data/fer2013/fer2013.csv.gz");
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_fast_model(&model);
    let json = tmp.path().join("r.json");
    let o = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--split",
        "PrivateTest",
        "--limit",
        "512",
        "--json",
        json.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["images"], 512);
    let acc = r["accuracy"].as_f64().unwrap();
    // The largest PrivateTest class (happy) is 24.5%: an untrained model cannot do much better.
    assert!(acc < 0.35, "untrained accuracy {acc}");
}

#[test]
fn a_camera_that_cannot_open_points_to_devices_and_input() {
    if Path::new("/dev/video0").exists() {
        eprintln!("a camera is present: this test needs a machine without one");
        return;
    }
    let o = run(&["run", "--camera", "0"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        (e.contains("fer-cam devices") && e.contains("--input")) || e.contains("camera support"),
        "{e}"
    );
}

#[test]
fn usage_errors_are_one_line_with_exit_1() {
    for args in [
        &["run", "--tta", "bogus"][..],
        &["run", "--min-face", "99999999999"],
        &["eval", "--no-such-flag"],
        &["no-such-command"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: {e}");
        assert!(e.starts_with("error: "), "{e}");
    }
    // Missing arguments are named, and clap's tips kept on a line of their own.
    let e = stderr(&run(&["report", "x.jsonl"]));
    assert!(
        e.contains("--out <OUT>") && e.contains("fer-cam report --help"),
        "{e}"
    );
    let e = stderr(&run(&["run", "--inptu", "x"]));
    assert!(
        e.lines()
            .nth(1)
            .is_some_and(|l| l.contains("tip:") && l.contains("'--input'")),
        "{e}"
    );
    // Allowed values are named; a negative number reaches validation as a number.
    assert!(stderr(&run(&["run", "--tta", "bogus"])).contains("ten-crop"));
    let e = stderr(&run(&["eval", "--data", "x.csv", "--threshold", "-1"]));
    assert!(e.contains("--threshold -1"), "{e}");
    // Help is data: stdout, exit 0.
    let o = run(&["run", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--input"));
}

#[test]
fn init_force_replaces_only_a_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    init_fast_model(&model);
    let force = |dir: &Path| {
        run(&[
            "init",
            "--out",
            dir.to_str().unwrap(),
            "--stem",
            "conv7x7_pool",
            "--force",
        ])
    };
    // A model directory fer-cam wrote: replaced.
    let o = force(&model);
    assert!(o.status.success(), "{}", stderr(&o));
    // A user's directory (anything else in it): refused, nothing deleted.
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep").unwrap();
    std::fs::write(mine.join("config.json"), "mine").unwrap();
    let o = force(&mine);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("left alone"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt")).unwrap(),
        "keep"
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("config.json")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    // A model directory with a user's file in it: refused, the file kept.
    std::fs::write(model.join("notes.txt"), "keep").unwrap();
    let o = force(&model);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("notes.txt"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(model.join("notes.txt")).unwrap(),
        "keep"
    );
    // A file in the way: refused and kept.
    let file = tmp.path().join("file");
    std::fs::write(&file, "keep").unwrap();
    assert_eq!(force(&file).status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
}

#[test]
fn an_output_that_is_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("fer.csv");
    common::write_fer_csv(&csv, 3);
    let before = std::fs::read(&csv).unwrap();
    // The same file under another spelling.
    let other = tmp.path().join(".").join("fer.csv");
    let o = run(&[
        "eval",
        "--data",
        csv.to_str().unwrap(),
        "--json",
        other.to_str().unwrap(),
        "--limit",
        "2",
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("also an input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&csv).unwrap(), before);
}

#[test]
fn a_write_killed_at_any_step_is_repaired_by_the_next() {
    // `FER_CAM_CRASH_AT=STEP` aborts the process (no cleanup, like a kill) when a directory
    // write reaches STEP; the next write of the same directory must succeed and leave nothing
    // beside it, and a reader in between must find a complete model (the old or the new).
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    init_fast_model(&model);
    let init = |crash: Option<&str>| {
        let mut c = Command::new(common::bin());
        c.args([
            "init",
            "--out",
            model.to_str().unwrap(),
            "--stem",
            "conv7x7_pool",
            "--force",
        ]);
        if let Some(step) = crash {
            c.env("FER_CAM_CRASH_AT", step);
        }
        c.output().unwrap()
    };
    for step in [
        "dir:locked",
        "dir:tmp-made",
        "dir:filled",
        "dir:synced",
        "dir:old-moved",
        "dir:new-in",
        "dir:done",
    ] {
        let o = init(Some(step));
        assert!(
            !o.status.success(),
            "{step}: the crash point was not reached"
        );
        let o = init(None);
        assert!(o.status.success(), "{step}: {}", stderr(&o));
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["m"], "{step}: leftovers");
        let mut inside: Vec<String> = std::fs::read_dir(&model)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        inside.sort();
        assert_eq!(inside, ["config.json", "model.safetensors"], "{step}");
    }
}

#[test]
fn two_writers_of_one_new_output_never_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    init_fast_model(&model);
    for round in 0..6 {
        let out = tmp.path().join(format!("export-{round}"));
        let spawn = || {
            Command::new(common::bin())
                .args(["export", "--model", model.to_str().unwrap(), "--out"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let wins = [&a, &b].iter().filter(|o| o.status.success()).count();
        assert_eq!(wins, 1, "round {round}: {} / {}", stderr(&a), stderr(&b));
        let loser = if a.status.success() { &b } else { &a };
        let e = stderr(loser);
        assert!(
            e.contains("already exists") || e.contains("being written by another fer-cam"),
            "{e}"
        );
        assert!(out.join("model.safetensors").is_file());
    }
    // Nothing but the outputs and the model is left.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 7);
}

#[test]
fn an_absurd_rayon_thread_count_is_ignored_with_a_warning() {
    for bad in ["100000", "lots", "0"] {
        let o = Command::new(common::bin())
            .args(["init", "--help"])
            .env("RAYON_NUM_THREADS", bad)
            .output()
            .unwrap();
        assert!(o.status.success());
        assert!(
            stderr(&o).contains(&format!("RAYON_NUM_THREADS={bad} ignored")),
            "{bad}: {}",
            stderr(&o)
        );
    }
    let o = Command::new(common::bin())
        .args(["init", "--help"])
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(!stderr(&o).contains("ignored"));
}
