//! `fer-cam train` end to end: all three stages into model directories that `eval` loads; an
//! interrupted (killed) and resumed run ends with the same weights as an uninterrupted one; a
//! non-finite loss stops the run and keeps the last good checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use candle_core::Device;

fn fer(args: &[&str]) -> Output {
    Command::new(common::bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Common flags of a small, fast run: fast stem, tiny stages.
fn small_run(stage: &str, data: &Path, run: &Path) -> Vec<String> {
    [
        "train",
        stage,
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--stem",
        "conv7x7_pool",
        "--no-cache",
        "--quiet",
        "--batch-size",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// [`small_run`] with its log on stderr (no `--quiet`) and `extra` arguments.
fn logged_run(stage: &str, data: &Path, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = small_run(stage, data, run);
    a.retain(|s| s != "--quiet");
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

fn load_all(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn synthetic(dir: &Path, per_split: usize) -> PathBuf {
    let csv = dir.join("fer.csv");
    common::write_fer_csv(&csv, per_split);
    csv
}

#[test]
fn train_all_stages_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, limit) = match common::shared_dir() {
        Some(s) => (s.join("data/fer2013/fer2013.csv.gz"), "320"),
        None => {
            common::skip_loudly(
                "train_all_stages_then_eval (real FER2013 rows)",
                Path::new("../shared"),
            );
            (synthetic(tmp.path(), 48), "48")
        }
    };
    let run = tmp.path().join("run");
    let mut a = small_run("all", &data, &run);
    for extra in [
        "--ssl-epochs",
        "1",
        "--classifier-epochs",
        "1",
        "--card-epochs",
        "2",
        "--train-limit",
        limit,
        "--val-limit",
        "64",
    ] {
        a.push(extra.into());
    }
    // SSL's default projector is wide; keep this run small through a config file.
    let mut cfg = fer_cam::train::TrainConfig::new(data.clone(), run.clone());
    cfg.ssl.projector = vec![128, 128];
    let cfg_path = tmp.path().join("train.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    a.push("--config".into());
    a.push(cfg_path.to_str().unwrap().into());
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    for stage in ["ssl:", "classifier:", "card:"] {
        assert!(out.contains(stage), "{out}");
    }
    assert!(out.contains("PublicTest accuracy"), "{out}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{metrics}");
    assert!(lines
        .iter()
        .all(|l| l["loss"].as_f64().unwrap().is_finite()));
    // The SSL epoch reports its features' kNN probe on PublicTest (and selects nothing on it).
    assert_eq!(lines[0]["stage"], "ssl");
    let knn = lines[0]["knn_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&knn), "{knn}");
    assert!(lines[0]["val_accuracy"].is_null());
    for plot in [
        "ssl_loss.svg",
        "ssl_knn_accuracy.svg",
        "classifier_loss.svg",
        "classifier_val_accuracy.svg",
        "card_val_accuracy.svg",
    ] {
        let svg = std::fs::read_to_string(run.join("plots").join(plot)).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
    }
    // Every stage's model directory loads; the CARD model scores a split.
    for stage in ["ssl", "classifier", "card"] {
        fer_cam::model::load_model_dir(&run.join(stage).join("model"), &Device::Cpu).unwrap();
    }
    let card = run.join("card/model");
    let o = fer(&[
        "eval",
        "--model",
        card.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--split",
        "PublicTest",
        "--limit",
        "64",
        "--samples",
        "4",
        "--no-cache",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("accuracy (CARD majority vote)"));

    // Distillation: the teacher's probabilities change the loss of an otherwise identical run
    // (same seed, same batches); a teacher with other classes is refused.
    let first_loss = |run: &Path| -> f64 {
        let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let l: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
        l["loss"].as_f64().unwrap()
    };
    // A one-epoch classifier run into `tmp/name`, with a `--teacher` for each of `teachers` and
    // `--init` where given.
    let classifier_run = |name: &str, teachers: &[&Path], init: Option<&Path>| {
        let dir = tmp.path().join(name);
        let mut a = small_run("classifier", &data, &dir);
        a.retain(|x| x != "--quiet"); // the log's lines on the teachers are checked below
        for extra in ["--classifier-epochs", "1", "--train-limit", limit] {
            a.push(extra.into());
        }
        a.extend(["--val-limit".into(), "64".into()]);
        let flags = teachers.iter().map(|&t| ("--teacher", t));
        for (flag, p) in flags.chain(init.map(|p| ("--init", p))) {
            a.extend([flag.into(), p.to_str().unwrap().into()]);
        }
        let o = fer(&args(&a));
        (dir, o)
    };
    let run_config = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    let (plain, o) = classifier_run("plain", &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let (distilled, o) = classifier_run("distilled", &[&run.join("card/model")], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (first_loss(&plain), first_loss(&distilled));
    assert!(
        a.is_finite() && b.is_finite() && (a - b).abs() > 1e-6,
        "{a} {b}"
    );
    let cfg = run_config(&distilled);
    assert_eq!(cfg["classifier"]["distill"]["tta"], "ten-crop", "{cfg}");
    assert!(cfg["classifier"]["distill"].get("also").is_none(), "{cfg}");
    // Two teachers (the CARD model and the plain run's f_φ): the mean of their probabilities, a
    // loss unlike either teacher's alone, and both named in the run's config.
    let plain_model = plain.join("classifier/model");
    let (alone, o) = classifier_run("plain-teaches", &[&plain_model], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let (both, o) = classifier_run("ensemble", &[&run.join("card/model"), &plain_model], None);
    assert!(o.status.success(), "{}", stderr(&o));
    // The log says how many models teach and how long their pass over the images took.
    for said in ["(the mean of 2 models)", "the teacher's answers took "] {
        assert!(stderr(&o).contains(said), "{said:?}:\n{}", stderr(&o));
    }
    let c = first_loss(&both);
    for other in [b, first_loss(&alone)] {
        assert!(c.is_finite() && (c - other).abs() > 1e-6, "{c} {other}");
    }
    let cfg = run_config(&both);
    assert_eq!(
        cfg["classifier"]["distill"]["also"][0],
        plain_model.to_str().unwrap(),
        "{cfg}"
    );
    let odd = tmp.path().join("odd-teacher");
    std::fs::create_dir_all(&odd).unwrap();
    let mut odd_cfg = fer_cam::model::read_config(&card).unwrap();
    odd_cfg.classes.truncate(3);
    std::fs::write(
        odd.join("config.json"),
        serde_json::to_string(&odd_cfg).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        card.join("model.safetensors"),
        odd.join("model.safetensors"),
    )
    .unwrap();
    for (name, teachers) in [
        ("odd", vec![odd.as_path()]),
        ("odd2", vec![&plain_model, &odd]),
    ] {
        let (_, o) = classifier_run(name, &teachers, None);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("odd-teacher"), "{}", stderr(&o));
    }

    // An exported model (f16 weights) starts a new cycle: `--init` and `--teacher` take it.
    let export = tmp.path().join("export");
    let o = fer(&[
        "export",
        "--model",
        card.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (from_export, o) = classifier_run("from-export", &[&export], Some(&export));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(from_export
        .join("classifier/model/model.safetensors")
        .exists());

    // A refused restart (no --resume over checkpoints) changes nothing, config.json included.
    let config_before = std::fs::read(run.join("config.json")).unwrap();
    let mut again = small_run("classifier", &data, &run);
    again.extend(["--lr".into(), "0.5".into()]);
    let o = fer(&args(&again));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(run.join("config.json")).unwrap(),
        config_before
    );
    // A second train on a run directory in use is refused (the test holds the lock).
    let lock = std::fs::File::options()
        .write(true)
        .open(run.join(".lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let mut resume = small_run("classifier", &data, &run);
    resume.push("--resume".into());
    let o = fer(&args(&resume));
    assert!(
        stderr(&o).contains("another `fer-cam train`"),
        "{}",
        stderr(&o)
    );
    drop(lock);
    // --resume on other data would mix two trainings: refused, naming both.
    std::fs::create_dir_all(tmp.path().join("other")).unwrap();
    let other = synthetic(&tmp.path().join("other"), 4);
    let mut resume = small_run("classifier", &other, &run);
    resume.push("--resume".into());
    let o = fer(&args(&resume));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("was started with data") && stderr(&o).contains("other"),
        "{}",
        stderr(&o)
    );
    // Zero epochs would ship an untrained stage: refused.
    let mut zero = small_run("classifier", &data, &tmp.path().join("zero"));
    zero.extend(["--classifier-epochs".into(), "0".into()]);
    let o = fer(&args(&zero));
    assert!(stderr(&o).contains("classifier.epochs 0"), "{}", stderr(&o));
    // A user's own directory is not a run directory: nothing in it is written or replaced.
    for (name, file) in [("config.json", "{\"mine\": 1}"), ("notes.txt", "keep")] {
        let mine = tmp.path().join(format!("mine-{name}"));
        std::fs::create_dir_all(&mine).unwrap();
        std::fs::write(mine.join(name), file).unwrap();
        let o = fer(&args(&small_run("classifier", &data, &mine)));
        assert!(!o.status.success());
        assert!(stderr(&o).contains("use a new directory"), "{}", stderr(&o));
        let left: Vec<_> = std::fs::read_dir(&mine).unwrap().collect();
        assert_eq!(left.len(), 1, "{name}");
        assert_eq!(std::fs::read_to_string(mine.join(name)).unwrap(), file);
    }
    // --resume with nothing to continue is an error, not a silent fresh start.
    let empty = tmp.path().join("empty-run");
    let mut resume = small_run("classifier", &data, &empty);
    resume.push("--resume".into());
    let o = fer(&args(&resume));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("nothing") || stderr(&o).contains("no checkpoint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn killed_then_resumed_run_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 160);
    let epochs = ["--classifier-epochs", "3"];
    // Uninterrupted.
    let run_a = tmp.path().join("a");
    let mut a = small_run("classifier", &data, &run_a);
    a.extend(epochs.iter().map(|s| s.to_string()));
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    // Interrupted: kill -9 once the first epoch's checkpoint exists, then resume.
    let run_b = tmp.path().join("b");
    let mut b = small_run("classifier", &data, &run_b);
    b.extend(epochs.iter().map(|s| s.to_string()));
    let mut child = Command::new(common::bin()).args(args(&b)).spawn().unwrap();
    let state = run_b.join("classifier/checkpoint/state.json");
    let start = Instant::now();
    let mut killed = false;
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let done = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["epochs_done"].as_u64());
        if done == Some(1) {
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    assert!(killed, "the run finished before it could be interrupted");
    // The model directory left behind by the killed run is whole.
    fer_cam::model::load_model_dir(&run_b.join("classifier/model"), &Device::Cpu).unwrap();
    // Without --resume the checkpoint is not silently overwritten.
    let o = fer(&args(&b));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    b.push("--resume".into());
    let o = fer(&args(&b));
    assert!(o.status.success(), "{}", stderr(&o));
    let wa = load_all(&run_a.join("classifier/checkpoint/model.safetensors"));
    let wb = load_all(&run_b.join("classifier/checkpoint/model.safetensors"));
    assert_eq!(wa.len(), wb.len());
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    let oa = load_all(&run_a.join("classifier/checkpoint/optimizer.safetensors"));
    let ob = load_all(&run_b.join("classifier/checkpoint/optimizer.safetensors"));
    assert!(oa == ob, "optimizer state differs after resume");

    // SIGINT instead of a kill: the stage stops before its next step with a one-line error that
    // names the checkpoint, promptly, and --resume again ends where the uninterrupted run did.
    let run_c = tmp.path().join("c");
    let mut c = small_run("classifier", &data, &run_c);
    c.extend(epochs.iter().map(|s| s.to_string()));
    let child = Command::new(common::bin())
        .args(args(&c))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let state = run_c.join("classifier/checkpoint/state.json");
    let start = Instant::now();
    let mut signalled = None;
    while start.elapsed() < Duration::from_secs(120) && signalled.is_none() {
        let done = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["epochs_done"].as_u64());
        if done == Some(1) {
            let pid = child.id().to_string();
            assert!(Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success());
            signalled = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = signalled.expect("the run finished before it could be interrupted");
    let o = child.wait_with_output().unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "slow to stop"
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("interrupted") && err.contains("--resume") && err.contains("checkpoint"),
        "{err}"
    );
    c.push("--resume".into());
    let o = fer(&args(&c));
    assert!(o.status.success(), "{}", stderr(&o));
    let wc = load_all(&run_c.join("classifier/checkpoint/model.safetensors"));
    for ((na, va), (_, vc)) in wa.iter().zip(&wc) {
        assert!(va == vc, "{na} differs after an interrupted run resumed");
    }
}

/// Without `--quiet`, stderr says what training does between steps, also when it is not a
/// terminal (a log file; the progress bar then does not draw): the data loaded, each stage's
/// epochs, each epoch's result, CARD's feature pass.
#[test]
fn training_says_what_it_does_in_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 48);
    let run = tmp.path().join("run");
    let extra = [
        "--from-scratch",
        "--classifier-epochs",
        "2",
        "--card-epochs",
        "1",
    ];
    let a = logged_run("all", &data, &run, &extra);
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    for line in [
        "loading ",
        "48 training and 48 PublicTest images",
        "classifier: epochs 1..=2 of 2",
        "classifier epoch 1/2: loss ",
        "classifier epoch 2/2: loss ",
        "card: f_phi's features of 48 training and 48 PublicTest images",
        "card epoch 1/1: loss ",
    ] {
        assert!(
            e.lines().any(|l| l.starts_with(line)),
            "{line:?} missing from\n{e}"
        );
    }
    // One line each, no progress-bar frames (no carriage returns, no escape sequences).
    assert!(!e.contains('\r') && !e.contains('\u{1b}'), "{e:?}");
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 48);
    let run = tmp.path().join("run");
    let mut a = small_run("classifier", &data, &run);
    a.extend(["--classifier-epochs", "1"].iter().map(|s| s.to_string()));
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let good = load_all(&run.join("classifier/checkpoint/model.safetensors"));
    // Continue with an absurd learning rate: the loss blows up in epoch 2.
    let mut b = small_run("classifier", &data, &run);
    b.extend(
        ["--classifier-epochs", "2", "--lr", "1e30", "--resume"]
            .iter()
            .map(|s| s.to_string()),
    );
    let o = fer(&args(&b));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("loss became") && e.contains("epoch 2"), "{e}");
    assert!(e.contains("last good checkpoint (1 epochs)"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // The checkpoint and the model directory are the ones from epoch 1.
    assert!(load_all(&run.join("classifier/checkpoint/model.safetensors")) == good);
    fer_cam::model::load_model_dir(&run.join("classifier/model"), &Device::Cpu).unwrap();
}

/// FER+ votes for `common::write_fer_csv`'s rows: one row left out as not a face and one as a
/// tie per split, the rest with a clear majority that cycles through the eight classes.
fn synthetic_votes(dir: &Path, per_split: usize) -> PathBuf {
    let path = dir.join("votes.csv");
    let mut text = String::from(
        "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n",
    );
    for usage in ["Training", "PublicTest", "PrivateTest"] {
        for i in 0..per_split {
            // Columns in the file's order: neutral .. contempt, unknown, NF.
            let mut v = [0u32; 10];
            match i {
                0 => v[9] = 10,
                1 => {
                    v[0] = 5;
                    v[1] = 5;
                }
                _ => {
                    v[i % 8] = 7;
                    v[(i + 3) % 8] = 3;
                }
            }
            let cells: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            text += &format!("{usage},f{i}.png,{}\n", cells.join(","));
        }
    }
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn crowd_votes_train_all_three_stages_and_score_by_class_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 24);
    let votes = synthetic_votes(tmp.path(), 24);
    // A recipe that learns from the votes mixed with FER2013's label (with mixup, and stability
    // training against camera conditions), CARD with vote y0.
    let mut cfg = fer_cam::train::TrainConfig::new(data.clone(), tmp.path().join("unused"));
    cfg.model.classes = fer_cam::data::ferplus::FERPLUS_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    cfg.labels = Some(votes.clone());
    cfg.classifier.targets = fer_cam::train::Targets::Votes;
    cfg.classifier.single_label_weight = 0.3;
    cfg.classifier.mixup = 0.4;
    cfg.classifier.consistency = Some(fer_cam::train::Consistency {
        weight: 1.0,
        webcam: fer_cam::data::augment::Webcam {
            framing_scale_sd: 0.15,
            noise_max: 4.0,
            ..Default::default()
        },
    });
    cfg.card.y0 = fer_cam::train::CardY0::Votes;
    let recipe = tmp.path().join("recipe.json");
    std::fs::write(&recipe, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let run = tmp.path().join("run");
    let mut a = small_run("all", &data, &run);
    a.extend(
        [
            "--config",
            recipe.to_str().unwrap(),
            "--ssl-epochs",
            "1",
            "--classifier-epochs",
            "1",
            "--card-epochs",
            "1",
        ]
        .map(String::from),
    );
    // Without --labels the recipe says what it needs.
    let o = fer(&args(&a));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pass --labels"), "{}", stderr(&o));
    // The synthetic votes are not FER+'s file: refused unless told.
    a.extend(["--labels", votes.to_str().unwrap()].map(String::from));
    let o = fer(&args(&a));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--labels-unverified"), "{}", stderr(&o));
    a.push("--labels-unverified".into());
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "FER+ labels PublicTest: 2 rows left out (0 unknown, 1 not a face, 1 without a single majority)"
        ),
        "{}",
        stderr(&o)
    );
    let model = run.join("card/model");
    // `eval --model M --split PublicTest EXTRA...`: its stdout and JSON report.
    let eval = |m: &Path, extra: &[&str]| {
        let json = tmp.path().join("e.json");
        let _ = std::fs::remove_file(&json);
        let mut e = vec![
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--no-cache",
            "--quiet",
            "--split",
            "PublicTest",
            "--json",
            json.to_str().unwrap(),
        ];
        e.extend_from_slice(extra);
        let stdout = common::stdout_of_success(fer(&e));
        (stdout, common::read_json(&json))
    };
    let with_votes = ["--labels", votes.to_str().unwrap(), "--labels-unverified"];
    // On the votes: 22 rows with a majority, scored against the crowd too.
    let (_, v) = eval(&model, &with_votes);
    assert_eq!(v["images"], 22);
    assert_eq!(v["label_rows_left_out"]["not_a_face"], 1);
    assert!(v["soft_nll"].as_f64().unwrap() > 0.0);
    assert!(v["soft_ece"].as_f64().is_some());
    assert_eq!(v["classes"].as_array().unwrap().len(), 8);
    // On FER2013's seven labels: all 24 rows scored, contempt a class the labels lack.
    let (_, v) = eval(&model, &[]);
    assert_eq!(v["images"], 24);
    assert_eq!(v["model_only_classes"], serde_json::json!(["contempt"]));
    assert!(v.get("soft_nll").is_none());
    // A seven-class model on the votes: the three contempt rows (7, 15, 23) are left out.
    let seven = tmp.path().join("seven");
    let o = fer(&[
        "init",
        "--out",
        seven.to_str().unwrap(),
        "--stem",
        "conv7x7_pool",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (stdout, v) = eval(&seven, &with_votes);
    assert!(
        stdout.contains("left out: 3 images of \"contempt\""),
        "{stdout}"
    );
    assert_eq!(v["images"], 19);
    assert_eq!(
        v["left_out"],
        serde_json::json!([{"class": "contempt", "images": 3}])
    );
}

/// `--precision bf16` (the config's `precision`): where the CPU has AVX512-BF16 the stage says
/// it runs its Winograd F(2x2) GEMMs in bf16 and its weights differ from the same f32 run's;
/// elsewhere it says it falls back to f32 and the weights are the f32 run's, bit for bit.
#[test]
fn bf16_precision_trains_in_bf16_where_the_cpu_has_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 48);
    let mut weights = Vec::new();
    for precision in ["f32", "bf16"] {
        let run = tmp.path().join(precision);
        let extra = ["--from-scratch", "--classifier-epochs", "1"];
        let a = logged_run(
            "classifier",
            &data,
            &run,
            &[&extra[..], &["--precision", precision]].concat(),
        );
        let o = fer(&args(&a));
        assert!(o.status.success(), "{}", stderr(&o));
        let e = stderr(&o);
        let bf16_here = fer_cam::kernels::precision::Precision::Bf16.available();
        let said = match (precision, bf16_here) {
            ("f32", _) => None,
            (_, true) => Some("classifier: the convolutions' Winograd F(2x2) GEMMs in bf16"),
            (_, false) => Some("classifier: precision bf16 asked, but this CPU has no AVX512-BF16"),
        };
        if let Some(line) = said {
            assert!(
                e.lines().any(|l| l.starts_with(line)),
                "{line:?} missing from\n{e}"
            );
        } else {
            assert!(!e.contains("bf16"), "an f32 run speaks of bf16:\n{e}");
        }
        let config = std::fs::read_to_string(run.join("config.json")).unwrap();
        assert_eq!(
            config.contains("\"precision\": \"bf16\""),
            precision == "bf16"
        );
        weights.push(load_all(&run.join("classifier/model/model.safetensors")));
    }
    let bf16_here = fer_cam::kernels::precision::Precision::Bf16.available();
    assert_eq!(
        weights[0] != weights[1],
        bf16_here,
        "bf16 weights differ from f32 exactly where AVX512-BF16 runs"
    );
}

/// A whole recipe on tiny data, one command: `train all` with a `ship` section calibrates on
/// PublicTest under each of its views and exports the model with them (f16 weights, the first
/// views the default) into RUN/ship/; run again with `--resume`, it keeps every output as it is.
#[test]
fn train_all_runs_a_whole_recipe_through_calibration_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 48);
    let run = tmp.path().join("run");
    let mut cfg = fer_cam::train::TrainConfig::new(data.clone(), run.clone());
    cfg.ssl.opt.epochs = 1;
    cfg.classifier.opt.epochs = 1;
    cfg.card.epochs = 1;
    cfg.ship = Some(fer_cam::train::ShipConfig {
        tta: vec![fer_cam::config::Tta::Flip, fer_cam::config::Tta::None],
        weights: fer_cam::model::export::StoredWeights::F16,
    });
    let recipe = tmp.path().join("recipe.json");
    std::fs::write(&recipe, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let a = logged_run("all", &data, &run, &["--config", recipe.to_str().unwrap()]);
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    for line in [
        "ssl: 1 epochs",
        "classifier: 1 epochs",
        "card: 1 epochs",
        "wrote ",
    ] {
        assert!(out.contains(line), "{line:?} missing from stdout\n{out}");
    }
    let ship = run.join("ship");
    let model = ship.join("model");
    let files: Vec<_> = [
        "calibration-flip.json",
        "calibration-none.json",
        "model/config.json",
    ]
    .iter()
    .map(|f| ship.join(f))
    .collect();
    for f in &files {
        assert!(f.exists(), "{} missing", f.display());
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["input"]["tta"], "flip", "{config}");
    let calibrated = config["card"]["calibrated"].to_string();
    assert!(
        calibrated.contains("none"),
        "the second calibration: {calibrated}"
    );
    let tensors =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let half = tensors
        .values()
        .filter(|t| t.dtype() == candle_core::DType::F16);
    assert!(half.count() > 0, "f16 weights in the shipped model");
    // The shipped model runs.
    let e = fer(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--no-cache",
        "--quiet",
    ]);
    assert!(e.status.success(), "{}", stderr(&e));
    // Again, resumed: nothing is redone or replaced.
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut again = a.clone();
    again.push("--resume".into());
    let o = fer(&args(&again));
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.matches("(an earlier run's): kept").count(), 3, "{e}");
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(before == after, "a resumed run changed the shipped files");
}

/// Every committed recipe (`recipe*.json`: what built the model beside it) and candidate
/// (`candidate*.json`: another network or schedule under the same name, to be measured against
/// it) is a valid training config, and each shipping recipe ships what is committed beside it:
/// the model's default views first, then every other set of views it carries a calibration
/// for, f16 weights.
#[test]
fn committed_recipes_are_valid_training_configs() {
    let mut seen = 0;
    for dir in std::fs::read_dir("models").unwrap() {
        let dir = dir.unwrap().path();
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for f in files {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            let config = name.starts_with("recipe") || name.starts_with("candidate");
            if !(config && name.ends_with(".json")) {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            let cfg: fer_cam::train::TrainConfig =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "recipes and candidates found: {seen}");
    for name in ["fer2013", "ferplus"] {
        let dir = Path::new("models").join(name);
        let text = std::fs::read_to_string(dir.join("recipe.json")).unwrap();
        let cfg: fer_cam::train::TrainConfig = serde_json::from_str(&text).unwrap();
        let ship = cfg.ship.expect("a built-in model's recipe ships");
        let model = fer_cam::model::read_config(&dir).unwrap();
        let mut carried = vec![model.input.tta];
        carried.extend(model.card.calibrated.keys().copied());
        assert_eq!(ship.tta[0], carried[0], "{name}: default views");
        let mut shipped = ship.tta.clone();
        shipped.sort();
        carried.sort();
        assert_eq!(shipped, carried, "{name}: calibrated views");
        assert_eq!(ship.weights, fer_cam::model::export::StoredWeights::F16);
    }
}

/// `--init` may move a model's 3x3 stem from stride 2 to stride 1 (the same weights at twice the
/// resolution), but no other change of network: another stem is refused, naming the model.
#[test]
fn init_moves_a_3x3_stem_to_stride_one_and_refuses_other_networks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 16);
    let run = |name: &str, stem: &str, init: Option<&Path>| {
        let dir = tmp.path().join(name);
        let mut cfg = fer_cam::train::TrainConfig::new(data.clone(), dir.clone());
        cfg.model.encoder.widths = [8, 8, 16, 16];
        cfg.model.encoder.blocks = [1, 1, 1, 1];
        cfg.model.encoder.cbam_reduction = 4;
        let cfg_path = tmp.path().join(format!("{name}.json"));
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        // small_run's flags, with this run's stem and the small network's config.
        let mut a = small_run("classifier", &data, &dir);
        let at = a.iter().position(|s| s == "--stem").unwrap() + 1;
        a[at] = stem.into();
        for extra in [
            "--config",
            cfg_path.to_str().unwrap(),
            "--classifier-epochs",
            "1",
        ] {
            a.push(extra.into());
        }
        if let Some(p) = init {
            a.extend(["--init".into(), p.to_str().unwrap().into()]);
        }
        (dir.join("classifier/model"), fer(&args(&a)))
    };
    let (s2, o) = run("s2", "conv3x3_s2", None);
    assert!(o.status.success(), "{}", stderr(&o));
    let (s1, o) = run("s1", "conv3x3", Some(&s2));
    assert!(o.status.success(), "{}", stderr(&o));
    let stem = fer_cam::model::read_config(&s1).unwrap().encoder.stem;
    assert_eq!(stem, fer_cam::config::Stem::Conv3x3);
    let (_, o) = run("pool", "conv7x7_pool", Some(&s2));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("encoder differs") && e.contains("s2"), "{e}");
}

/// `classifier.keep: last` keeps the last epoch's weights as the stage's model, whatever its
/// PublicTest score, and says so per epoch; a finished stage that chose its best epoch and is
/// resumed with `last` rewrites its model from the last epoch (its checkpoint).
#[test]
fn keep_last_ends_with_the_last_epochs_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 32);
    let config = |name: &str, keep: fer_cam::train::Keep| {
        let dir = tmp.path().join(name);
        let mut cfg = fer_cam::train::TrainConfig::new(data.clone(), dir.clone());
        cfg.model.encoder.widths = [8, 8, 16, 16];
        cfg.model.encoder.blocks = [1, 1, 1, 1];
        cfg.model.encoder.cbam_reduction = 4;
        cfg.classifier.keep = keep;
        let path = tmp.path().join(format!("{name}-{keep:?}.json"));
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let mut a = logged_run("classifier", &data, &dir, &["--classifier-epochs", "3"]);
        a.extend(["--config".into(), path.to_str().unwrap().into()]);
        (dir, a)
    };
    let same = |dir: &Path| {
        load_all(&dir.join("classifier/model/model.safetensors"))
            == load_all(&dir.join("classifier/checkpoint/model.safetensors"))
    };
    let state = |dir: &Path| -> serde_json::Value {
        let p = dir.join("classifier/checkpoint/state.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };

    let (last, a) = config("last", fer_cam::train::Keep::Last);
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("(the last epoch is kept)").count(), 3);
    assert!(same(&last), "the model is not the last epoch's");
    assert_eq!(state(&last)["best_epoch"], 3);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("(epoch 3)"), "{out}");

    // A run that chose its best epoch, made to have chosen the first (as a run whose later
    // epochs scored lower has), then resumed asking for the last.
    let (best, a) = config("best", fer_cam::train::Keep::Best);
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let mut s = state(&best);
    s["best_epoch"] = 1.into();
    std::fs::write(
        best.join("classifier/checkpoint/state.json"),
        serde_json::to_string(&s).unwrap(),
    )
    .unwrap();
    let (_, mut a) = config("best", fer_cam::train::Keep::Last);
    a.push("--resume".into());
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("keeping the last epoch's weights (3), not epoch 1's"),
        "{e}"
    );
    assert!(same(&best), "the resumed model is not the last epoch's");
    assert_eq!(state(&best)["best_epoch"], 3);
    // Resumed again, nothing more changes.
    let o = fer(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("keeping the last"), "{}", stderr(&o));
}
