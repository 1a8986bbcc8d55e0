//! `fer-cam run` end to end: the y4m clip, video through ffmpeg and the group stills from
//! ../shared (exact face counts), stills alone or as a sequence, damaged streams, signals,
//! `--max-fps`, lossless stdin, a reader that closes stdout (or stderr), a slow reader (bounded
//! memory, counted drops), `--annotate` and `report`, eight-class models, and a model whose
//! answers overflow.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    let o = Command::new(common::bin())
        .args([
            "init",
            "--out",
            m.to_str().unwrap(),
            "--stem",
            "conv7x7_pool",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    m
}

fn run(args: &[&str]) -> Output {
    Command::new(common::bin()).args(args).output().unwrap()
}

/// `fer-cam run --model M --input INPUT EXTRA...`.
fn run_on(m: &Path, input: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "run",
        "--model",
        m.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    run(&a)
}

/// Starts fer-cam with stdin, stdout and stderr piped.
fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(common::bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Everything a spawned run wrote to stderr (read to its end).
fn stderr_of(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// A folder of two stills: `a_broken.png` (not an image) and `b_ok.png`.
fn stills_with_one_broken(tmp: &Path) -> PathBuf {
    let dir = tmp.join("stills");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a_broken.png"), b"not a png").unwrap();
    image::GrayImage::from_pixel(64, 64, image::Luma([90u8]))
        .save(dir.join("b_ok.png"))
        .unwrap();
    dir
}

fn lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Checks the fields every line and every face must have.
fn check_schema(v: &Value, classes: usize) {
    assert_eq!(v["v"], 1);
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    assert!(v["mono_ms"].as_f64().unwrap() >= 0.0);
    match v["type"].as_str().unwrap() {
        "frame" => {
            assert!(v["frame"].is_u64() && v["dropped"].is_u64() && v["source"].is_string());
            assert!(v["pts_s"].as_f64().is_some_and(|t| t >= 0.0) || v["pts_s"].is_null());
            assert_eq!(v["size"].as_array().unwrap().len(), 2);
            let lat = &v["latency_ms"];
            for k in [
                "capture_to_emit",
                "queue",
                "detect",
                "crop",
                "infer",
                "emit",
            ] {
                assert!(lat[k].as_f64().unwrap() >= 0.0, "{k}");
            }
            // The parts are consecutive stretches of the total (rounding aside).
            let parts: f64 = ["queue", "detect", "crop", "infer", "emit"]
                .iter()
                .map(|k| lat[*k].as_f64().unwrap())
                .sum();
            assert!(
                parts <= lat["capture_to_emit"].as_f64().unwrap() + 0.06,
                "{lat}"
            );
            for f in v["faces"].as_array().unwrap() {
                assert!(f["id"].as_u64().unwrap() >= 1);
                assert_eq!(f["box"].as_array().unwrap().len(), 4);
                assert!(f["det_score"].is_number() && f["label"].is_string());
                assert!(f["certain"].is_boolean() && f["entropy"].is_number());
                assert!(f["p_value"].is_number() || f["p_value"].is_null());
                let probs = f["probs"].as_object().unwrap();
                assert_eq!(probs.len(), classes);
                let sum: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
                assert!((sum - 1.0).abs() < 1e-3, "{sum}");
                assert_eq!(f["votes"].as_object().unwrap().len(), classes);
            }
        }
        "start" => {
            // What produced the file.
            assert!(v["version"].is_string() && v["source"].is_string());
            assert_eq!(v["model"]["sha256"].as_str().unwrap().len(), 64);
            assert!(v["model"]["name"].is_string());
            assert_eq!(v["classes"].as_array().unwrap().len(), classes);
            for k in ["samples", "steps", "seed"] {
                assert!(v[k].is_u64(), "{k}");
            }
            assert!(v["views"].is_string() && v["detector"]["full"].is_string());
            assert!(v["live"].is_boolean() && v["stills"].is_boolean());
            assert!(v["source_fps"].is_number() || v["source_fps"].is_null());
        }
        "status" | "warning" | "summary" => {}
        other => panic!("unknown type {other}"),
    }
}

fn shared_media(test: &str) -> Option<PathBuf> {
    match common::shared_dir() {
        Some(s) => Some(s.join("media")),
        None => {
            common::skip_loudly(test, Path::new("../shared/media"));
            None
        }
    }
}

#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn y4m_clip_streams_valid_lines_with_one_stable_face() {
    let Some(media) = shared_media("y4m_clip_streams_valid_lines_with_one_stable_face") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let clip = media.join("woman_expressions_320x180_2fps.y4m");
    let o = run_on(&m, &clip, &["--samples", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    ls.iter().for_each(|l| check_schema(l, 7));
    let frames: Vec<&Value> = ls.iter().filter(|l| l["type"] == "frame").collect();
    assert_eq!(frames.len(), 40);
    let nums: Vec<u64> = frames
        .iter()
        .map(|f| f["frame"].as_u64().unwrap())
        .collect();
    assert!(nums.windows(2).all(|w| w[1] > w[0]), "{nums:?}");
    // Media time: the frame number over the clip's 2 fps.
    for f in &frames {
        let want = f["frame"].as_f64().unwrap() / 2.0;
        assert!((f["pts_s"].as_f64().unwrap() - want).abs() < 1e-9, "{f}");
    }
    assert_eq!(ls[0]["type"], "start");
    assert_eq!(ls[0]["source_fps"], 2.0);
    assert_eq!(ls.last().unwrap()["media_s"], 20.0);
    let with_face = frames
        .iter()
        .filter(|f| !f["faces"].as_array().unwrap().is_empty())
        .count();
    assert!(with_face >= 36, "faces in only {with_face} of 40 frames");
    let mut ids: Vec<u64> = frames
        .iter()
        .flat_map(|f| {
            f["faces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_u64().unwrap())
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, vec![1], "one woman, one id");
    let summary = ls.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["frames"], 40);
    // The same clip through stdin, as `ffmpeg ... -f yuv4mpegpipe - | fer-cam run --input -`.
    let mut child = spawn(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--input",
        "-",
        "--samples",
        "4",
    ]);
    let bytes = std::fs::read(&clip).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    let frames = ls.iter().filter(|l| l["type"] == "frame").count();
    let summary = ls.last().unwrap();
    assert_eq!(summary["source"], "stdin");
    assert_eq!(frames as u64 + summary["dropped"].as_u64().unwrap(), 40);
}

#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn group_stills_have_several_faces() {
    let Some(media) = shared_media("group_stills_have_several_faces") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let stills = media.join("stills");
    let o = run_on(&m, &stills, &["--samples", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    ls.iter().for_each(|l| check_schema(l, 7));
    let frames: Vec<&Value> = ls.iter().filter(|l| l["type"] == "frame").collect();
    assert_eq!(frames.len(), 6);
    let count = |name: &str| {
        frames
            .iter()
            .find(|f| f["file"].as_str().unwrap().ends_with(name))
            .map(|f| f["faces"].as_array().unwrap().len())
            .unwrap()
    };
    // Exact counts, as measured (the whole-photo search is deterministic): a face lost or
    // a false one found is a change to look at, not noise.
    for (name, want) in [
        ("dlib_2007_007763.jpg", 7),
        ("dlib_2008_002470.jpg", 6),
        ("dlib_2008_002506.jpg", 3),
        ("dlib_2008_007676.jpg", 7),
        ("group5_pyfeat_multi_face.jpg", 5),
        ("single_face_pyfeat.jpg", 1),
    ] {
        assert_eq!(count(name), want, "{name}");
    }
    // --max-faces keeps the largest faces of each photo and says how many it left out.
    let all: u64 = frames
        .iter()
        .map(|f| f["faces"].as_array().unwrap().len() as u64)
        .sum();
    let o = run_on(&m, &stills, &["--samples", "4", "--max-faces", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let capped = lines(&o);
    let kept: u64 = capped
        .iter()
        .filter(|l| l["type"] == "frame")
        .map(|f| {
            let n = f["faces"].as_array().unwrap().len() as u64;
            assert!(n <= 2);
            n
        })
        .sum();
    let left = capped.last().unwrap()["faces_left_out"].as_u64().unwrap();
    assert_eq!(kept + left, all);
    assert!(left > 0);
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains(&format!("{left} face(s) beyond --max-faces 2")));
}

fn synthetic_y4m(frames: usize) -> Vec<u8> {
    synthetic_y4m_sized(frames, 64, 48)
}

/// `frames` frames of `w`x`h` 4:2:0 video (a moving gray ramp).
fn synthetic_y4m_sized(frames: usize, w: usize, h: usize) -> Vec<u8> {
    let mut v = format!("YUV4MPEG2 W{w} H{h} F25:1 Ip C420jpeg\n").into_bytes();
    for f in 0..frames {
        v.extend_from_slice(b"FRAME\n");
        v.extend((0..w * h).map(|i| ((i + f) % 251) as u8));
        v.extend(std::iter::repeat_n(128u8, 2 * (w / 2) * (h / 2)));
    }
    v
}

#[test]
fn truncated_and_garbage_streams_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let mut data = synthetic_y4m(3);
    data.truncate(data.len() - 100);
    let cut = tmp.path().join("cut.y4m");
    std::fs::write(&cut, &data).unwrap();
    let o = run_on(&m, &cut, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("frame 2: truncated"), "{err}");
    // The frames before the damage were still emitted, and the summary after them.
    let ls = lines(&o);
    assert_eq!(ls.iter().filter(|l| l["type"] == "frame").count(), 2);
    assert_eq!(ls.last().unwrap()["type"], "summary");
    assert_eq!(ls.last().unwrap()["frames"], 2);
    let junk = tmp.path().join("junk.y4m");
    std::fs::write(&junk, b"\x00\x01garbage that is not a stream\n").unwrap();
    let o = run_on(&m, &junk, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.trim().lines().last().unwrap().starts_with("error: ")
            && err.contains("not a YUV4MPEG2"),
        "{err}"
    );
    // An unreadable still is a counted warning, not the end of the run.
    let dir = stills_with_one_broken(tmp.path());
    let o = run_on(&m, &dir, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    let warn = ls.iter().find(|l| l["type"] == "warning").unwrap();
    assert!(warn["message"].as_str().unwrap().contains("a_broken.png"));
    assert_eq!(warn["count"], 1);
    assert_eq!(ls.iter().filter(|l| l["type"] == "frame").count(), 1);
    assert_eq!(ls.last().unwrap()["warnings"], 1);
    // Bad options are refused before anything starts.
    let o = run_on(&m, &cut, &["--detect-every", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--detect-every 0"));
    let o = run(&["run", "--model", m.to_str().unwrap(), "--input", "talk.mp4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("talk.mp4"));
    // The input's kind comes from its bytes: a stream named .dat is read as the stream it is,
    // raw .yuv (no header) is refused, and a lone file that is not a picture is an error.
    let dat = tmp.path().join("clip.dat");
    std::fs::write(&dat, synthetic_y4m(2)).unwrap();
    let o = run_on(&m, &dat, &[]);
    assert!(o.status.success());
    assert_eq!(lines(&o).iter().filter(|l| l["type"] == "frame").count(), 2);
    let yuv = tmp.path().join("x.yuv");
    std::fs::write(&yuv, [0u8; 64]).unwrap();
    let o = run_on(&m, &yuv, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("raw video has no header"));
    let fake = tmp.path().join("x.png");
    std::fs::write(&fake, b"hello").unwrap();
    let o = run_on(&m, &fake, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("could be decoded"));
    // A status line every 0.1 ms would flood the reader.
    let o = run_on(&m, &dat, &["--status-every", "0.0001"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--status-every"));
}

#[test]
fn a_signal_stops_a_silent_stdin_run_promptly_with_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    // stdin stays open and silent: the capture thread is blocked in read().
    let mut child = spawn(&["run", "--model", m.to_str().unwrap(), "--input", "-"]);
    let _stdin = child.stdin.take();
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lines(&o).last().unwrap()["type"], "summary");
}

#[test]
fn max_fps_skips_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let clip = tmp.path().join("c.y4m");
    std::fs::write(&clip, synthetic_y4m(10)).unwrap(); // 25 fps: 0.4 s paced
    let o = run_on(&m, &clip, &["--realtime", "--max-fps", "5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    let frames = ls.iter().filter(|l| l["type"] == "frame").count() as u64;
    let s = ls.last().unwrap();
    let (dropped, skipped) = (
        s["dropped"].as_u64().unwrap(),
        s["skipped"].as_u64().unwrap(),
    );
    assert!(skipped >= 5, "skipped {skipped}");
    assert_eq!(frames + dropped + skipped, 10);
}

/// A reader that closes stdout ends the run with success, and it is the closed stdout that ends
/// it: the input is a pipe this test keeps open and fed until the daemon has exited, so neither
/// the end of the input nor a fast machine can end the run first. The frames it had read and
/// not processed are said as left in the pipeline by the stop, not as a busy live source's
/// drops (a pipe is never dropped from).
#[test]
fn closed_stdout_ends_the_run_with_success() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let mut child = spawn(&["run", "--model", m.to_str().unwrap(), "--input", "-"]);
    let mut stdin = child.stdin.take().unwrap();
    let video = synthetic_y4m(1);
    let (header, frame) = video.split_at(video.iter().position(|&b| b == b'\n').unwrap() + 1);
    let (frame, header) = (frame.to_vec(), header.to_vec());
    // Frames until the daemon is gone (its stdin then fails with a broken pipe).
    let feeder = std::thread::spawn(move || {
        let mut sent = 0u64;
        if stdin.write_all(&header).is_err() {
            return sent;
        }
        while stdin.write_all(&frame).is_ok() {
            sent += 1;
        }
        sent
    });
    let mut line = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"type\":\"start\""), "{line}");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"type\":\"frame\""), "{line}");
    drop(reader);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the daemon ran on for 60 s after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let sent = feeder.join().unwrap();
    assert!(sent >= 2, "only {sent} frames were fed");
    let err = stderr_of(&mut child);
    assert!(!err.contains("pipeline was busy"), "{err}");
    if err.contains("were not processed") {
        assert!(
            err.contains("still in the pipeline when the run stopped (stdout was closed)"),
            "{err}"
        );
    }
}

/// The process's peak resident set size so far (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Feeds `frames` VGA frames on stdin faster than the daemon classifies them, while reading its
/// stdout slowly; `--live` when `live`. Returns (peak RSS in KiB, frames emitted, frames
/// dropped).
fn slow_reader_run(m: &Path, frames: usize, live: bool) -> (u64, u64, u64) {
    let mut child = spawn(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--input",
        "-",
        if live { "--live" } else { "--stats" },
        "--samples",
        "2",
        "--status-every",
        "0",
    ]);
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&synthetic_y4m_sized(frames, 640, 480));
    });
    // Poll the child's high-water mark until it is gone (a zombie has none).
    let monitor = std::thread::spawn(move || {
        let (mut peak, mut seen) = (0, false);
        loop {
            match peak_rss_kib(pid) {
                Some(kib) => (peak, seen) = (peak.max(kib), true),
                None if seen => return peak,
                None => {}
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 256];
    let mut text = Vec::new();
    // Read slowly: 256 bytes every 20 ms.
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
        if text.len() < 20_000 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    writer.join().unwrap();
    let err = stderr_of(&mut child);
    let status = child.wait().unwrap();
    let peak = monitor.join().unwrap();
    assert!(status.success());
    let ls: Vec<Value> = String::from_utf8_lossy(&text)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = ls.last().unwrap();
    // Drops are said on stderr at exit, with or without --stats.
    let dropped = summary["dropped"].as_u64().unwrap();
    assert_eq!(
        err.contains(&format!("{dropped} dropped because the pipeline was busy")),
        dropped > 0,
        "{err}"
    );
    assert_eq!(summary["type"], "summary");
    let (done, dropped) = (
        summary["frames"].as_u64().unwrap(),
        summary["dropped"].as_u64().unwrap(),
    );
    assert_eq!(done + dropped, frames as u64);
    (peak, done, dropped)
}

#[test]
fn stdin_is_lossless_by_default_however_fast_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    // The writer hands over 400 VGA frames at once, much faster than they are classified: it
    // must wait (back-pressure), and every frame must come out, with memory as flat as --live.
    let (small, _, _) = slow_reader_run(&m, 40, false);
    let (peak, done, dropped) = slow_reader_run(&m, 400, false);
    assert_eq!((done, dropped), (400, 0));
    assert!(
        peak < small + 50_000,
        "peak RSS {peak} KiB with 400 frames against {small} KiB with 40"
    );
}

#[test]
fn slow_reader_keeps_memory_flat_and_counts_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    // 400 VGA frames are 184 MB of luma and chroma: a daemon that queued the frames it cannot
    // keep up with, instead of dropping them, would peak over 150 MB above the same run with 40.
    let (small, _, _) = slow_reader_run(&m, 40, true);
    let (peak, done, dropped) = slow_reader_run(&m, 400, true);
    eprintln!("slow reader: peak RSS {peak} KiB (40 frames: {small} KiB), {done} emitted, {dropped} dropped");
    assert!(
        dropped > 0,
        "frames arriving faster than they are classified must be dropped"
    );
    assert!(
        peak < small + 50_000,
        "peak RSS {peak} KiB with 400 frames against {small} KiB with 40"
    );
}

/// The frames of a 4:2:0 YUV4MPEG2 stream: (width, height, [luma plane per frame]).
fn y4m_frames(bytes: &[u8]) -> (usize, usize, Vec<Vec<u8>>) {
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    let header = std::str::from_utf8(&bytes[..nl]).unwrap();
    let tag = |t: char| -> usize {
        header
            .split(' ')
            .find_map(|p| p.strip_prefix(t))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (w, h) = (tag('W'), tag('H'));
    let frame = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
    let mut rest = &bytes[nl + 1..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        assert!(rest.starts_with(b"FRAME\n"), "frame {}", frames.len());
        frames.push(rest[6..6 + w * h].to_vec());
        rest = &rest[6 + frame..];
    }
    (w, h, frames)
}

/// A run's lines without what changes from run to run (times, rates, latencies).
/// The output's lines with everything that depends on timing removed: clock fields, and the
/// `status` lines, which come every `--status-every` seconds (how many depends on the machine's
/// load).
fn timeless(o: &Output) -> Vec<Value> {
    lines(o)
        .into_iter()
        .filter(|v| v["type"] != "status")
        .map(|mut v| {
            for k in [
                "ts",
                "mono_ms",
                "latency_ms",
                "seconds",
                "fps",
                "cpu_percent",
            ] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

#[test]
fn annotate_writes_every_frame_and_never_replaces_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let clip = tmp.path().join("s.y4m");
    std::fs::write(&clip, synthetic_y4m(5)).unwrap();
    let out = tmp.path().join("a.y4m");
    let args = |annotate: bool| {
        let mut a = vec![
            "run",
            "--model",
            m.to_str().unwrap(),
            "--input",
            clip.to_str().unwrap(),
        ];
        if annotate {
            a.extend(["--annotate", out.to_str().unwrap()]);
        }
        run(&a)
    };
    let o = args(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (w, h, frames) = y4m_frames(&std::fs::read(&out).unwrap());
    assert_eq!((w, h, frames.len()), (64, 48, 5));
    let input = y4m_frames(&synthetic_y4m(5)).2;
    assert!(frames[3] != input[3], "the class legend is drawn");
    // A second run refuses to replace the file, before reading any frame.
    let before = std::fs::read(&out).unwrap();
    let o = args(true);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("never replaces"));
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert_eq!(timeless(&args(false)), timeless(&args(false)));
    // Video never goes into the JSON stream, and `-` is no file name: both refused up front,
    // with nothing on stdout and no file named `-` made.
    let c = clip.to_str().unwrap();
    for target in ["-", "/dev/stdout"] {
        let o = Command::new(common::bin())
            .current_dir(tmp.path())
            .args(["run", "--model", m.to_str().unwrap(), "--input", c])
            .args(["--annotate", target])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{target}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("JSON lines"), "{target}: {err}");
        assert!(o.stdout.is_empty(), "{target}");
    }
    assert!(!tmp.path().join("-").exists());
}

#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn annotated_clip_marks_the_face_and_keeps_the_json() {
    let Some(media) = shared_media("annotated_clip_marks_the_face_and_keeps_the_json") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let clip = media.join("woman_expressions_320x180_2fps.y4m");
    let out = tmp.path().join("A.y4m");
    let base = [
        "run",
        "--model",
        m.to_str().unwrap(),
        "--input",
        clip.to_str().unwrap(),
        "--samples",
        "8",
    ];
    let plain = run(&base);
    let annotated = run(&[&base[..], &["--annotate", out.to_str().unwrap()]].concat());
    assert!(annotated.status.success());
    // The JSON lines are the same with and without --annotate.
    assert_eq!(timeless(&plain), timeless(&annotated));
    let (w, h, frames) = y4m_frames(&std::fs::read(&out).unwrap());
    assert_eq!((w, h, frames.len()), (320, 180, 40));
    let (_, _, input) = y4m_frames(&std::fs::read(&clip).unwrap());
    let json: Vec<Value> = lines(&annotated)
        .into_iter()
        .filter(|l| l["type"] == "frame")
        .collect();
    let mut checked = 0;
    for (i, f) in json.iter().enumerate() {
        let boxes: Vec<[i64; 4]> = f["faces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                let b: Vec<i64> = x["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                [b[0], b[1], b[2], b[3]]
            })
            .collect();
        let (a, src) = (&frames[i], &input[i]);
        for b in &boxes {
            // The box's left edge is drawn over (solid, or dashed when uncertain).
            let x = b[0] as usize + 1;
            let rows = b[1].max(0)..(b[1] + b[3]).min(h as i64);
            let drawn = rows
                .clone()
                .map(|y| y as usize * w + x)
                .filter(|&at| a[at] != src[at])
                .count();
            let len = rows.end - rows.start;
            assert!(
                drawn as i64 >= len / 3,
                "frame {i}: left edge {drawn}/{len}"
            );
            checked += 1;
        }
        // Pixels 24+ px from every box (and above the legend) are untouched.
        for y in (0..h - 24).step_by(7) {
            for x in (0..w).step_by(7) {
                let far = boxes.iter().all(|b| {
                    let (x, y) = (x as i64, y as i64);
                    x < b[0] - 24
                        || x > b[0] + b[2].max(56) + 24
                        || y < b[1] - 24
                        || y > b[1] + b[3] + 24
                });
                if far {
                    assert!(
                        a[y * w + x] == src[y * w + x],
                        "frame {i} ({x}, {y}) changed"
                    );
                }
            }
        }
    }
    assert!(checked >= 36, "only {checked} faces checked");

    // `report` on this run, with a damaged line appended: every file, one CSV row per face.
    let jsonl = tmp.path().join("run.jsonl");
    let mut text = annotated.stdout.clone();
    text.extend_from_slice(b"{\"v\":1,\"type\":\"frame\",\"fra\n");
    std::fs::write(&jsonl, &text).unwrap();
    let rep = tmp.path().join("report");
    let o = run(&[
        "report",
        jsonl.to_str().unwrap(),
        "--out",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 malformed"));
    for f in [
        "index.html",
        "faces.csv",
        "summary.json",
        "latency.svg",
        "emotion-share.svg",
    ] {
        assert!(rep.join(f).is_file(), "{f}");
    }
    assert!(rep.join("timeline-track-1.svg").is_file());
    let faces: usize = json
        .iter()
        .map(|f| f["faces"].as_array().unwrap().len())
        .sum();
    let csv = std::fs::read_to_string(rep.join("faces.csv")).unwrap();
    assert_eq!(csv.lines().count(), faces + 1);
    assert_eq!(faces, 40);
    // Another schema version: a one-line error, nothing written.
    let mut child = spawn(&[
        "report",
        "-",
        "--out",
        tmp.path().join("r2").to_str().unwrap(),
    ]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"v\":2,\"type\":\"frame\"}\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("schema version 2"));
    assert!(!tmp.path().join("r2").exists());
}

#[test]
fn a_closed_stderr_does_not_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let dir = stills_with_one_broken(tmp.path());
    let mut child = spawn(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--input",
        dir.to_str().unwrap(),
    ]);
    // Nobody reads stderr: the warning's write fails with a broken pipe.
    drop(child.stderr.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "exit {:?}", o.status);
    let ls = lines(&o);
    assert!(ls.iter().any(|l| l["type"] == "warning"));
    assert_eq!(ls.last().unwrap()["type"], "summary");
}

/// A model with FER+'s eight classes: the JSON names all eight, `--annotate` and `report` draw
/// them, contempt in its own colour.
#[test]
fn eight_class_models_flow_through_run_annotate_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m8");
    let classes = fer_cam::data::ferplus::FERPLUS_CLASSES.join(",");
    let o = run(&[
        "init",
        "--out",
        m.to_str().unwrap(),
        "--stem",
        "conv7x7_pool",
        "--classes",
        &classes,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The repository's face fixture, large enough for the full-frame search.
    let face = image::GrayImage::from_raw(128, 128, common::face_fixture_128()).unwrap();
    let big = image::imageops::resize(&face, 256, 256, image::imageops::FilterType::Triangle);
    let still = tmp.path().join("face.png");
    big.save(&still).unwrap();
    let out = tmp.path().join("a.y4m");
    let o = run_on(&m, &still, &["--annotate", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = lines(&o);
    let faces: Vec<&Value> = json
        .iter()
        .filter(|v| v["type"] == "frame")
        .flat_map(|v| v["faces"].as_array().unwrap())
        .collect();
    assert_eq!(faces.len(), 1, "{json:?}");
    let probs = faces[0]["probs"].as_object().unwrap();
    assert_eq!(
        probs.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        fer_cam::data::ferplus::FERPLUS_CLASSES
    );
    let (_, _, frames) = y4m_frames(&std::fs::read(&out).unwrap());
    assert_eq!(frames.len(), 1);
    let jsonl = tmp.path().join("run.jsonl");
    std::fs::write(&jsonl, &o.stdout).unwrap();
    let rep = tmp.path().join("report");
    let r = run(&[
        "report",
        jsonl.to_str().unwrap(),
        "--out",
        rep.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let page = std::fs::read_to_string(rep.join("index.html")).unwrap();
    assert!(
        page.contains("contempt"),
        "the report names the eighth class"
    );
    let contempt = fer_cam::palette::class_rgb("contempt", 7);
    for (i, c) in fer_cam::config::FER2013_CLASSES.iter().enumerate() {
        assert_ne!(fer_cam::palette::class_rgb(c, i), contempt, "{c}");
    }
    // Named by a synonym, a class keeps its colour.
    assert_eq!(
        fer_cam::palette::class_rgb("Happiness", 3),
        fer_cam::palette::class_rgb("happy", 3)
    );
}

/// A folder of the repository's face (256x256) saved twice, as two unrelated photos, beside a
/// note and a clip that are not stills.
fn two_photos_of_one_face(tmp: &Path) -> PathBuf {
    let dir = tmp.join("photos");
    std::fs::create_dir_all(&dir).unwrap();
    let face = image::GrayImage::from_raw(128, 128, common::face_fixture_128()).unwrap();
    let big = image::imageops::resize(&face, 256, 256, image::imageops::FilterType::Triangle);
    big.save(dir.join("a.png")).unwrap();
    big.save(dir.join("b.png")).unwrap();
    std::fs::write(dir.join("notes.txt"), b"not a picture").unwrap();
    std::fs::write(dir.join("talk.mp4"), b"not read here").unwrap();
    dir
}

/// The face ids of each frame line.
fn ids_per_frame(ls: &[Value]) -> Vec<Vec<u64>> {
    ls.iter()
        .filter(|l| l["type"] == "frame")
        .map(|f| {
            f["faces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn stills_are_independent_unless_a_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let dir = two_photos_of_one_face(tmp.path());
    // Smoothing asked for: it must not blend one photo's face into the other's.
    let o = run_on(&m, &dir, &["--samples", "4", "--smooth", "0.3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    ls.iter().for_each(|l| check_schema(l, 7));
    assert_eq!(ls[0]["type"], "start");
    assert_eq!(ls[0]["stills"], true);
    let ids = ids_per_frame(&ls);
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|f| !f.is_empty()), "{ids:?}");
    assert!(
        ids[0].iter().all(|i| !ids[1].contains(i)),
        "an id crossed photos: {ids:?}"
    );
    let frames: Vec<&Value> = ls.iter().filter(|l| l["type"] == "frame").collect();
    assert!(frames.iter().all(|f| f["pts_s"].is_null()));
    // The second photo's answer is its own: the same as without smoothing (the sampler's
    // noise depends only on the order faces are classified in).
    let plain = lines(&run_on(&m, &dir, &["--samples", "4"]));
    let second = |ls: &[Value]| {
        ls.iter().filter(|l| l["type"] == "frame").nth(1).unwrap()["faces"][0]["probs"].clone()
    };
    assert_eq!(second(&ls), second(&plain));
    // The files that are not stills are said, once, with a hint for the video.
    let warn: Vec<&Value> = ls.iter().filter(|l| l["type"] == "warning").collect();
    assert_eq!(warn.len(), 1, "{warn:?}");
    let msg = warn[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("skipped 2") && msg.contains("notes.txt") && msg.contains("--input FILE"),
        "{msg}"
    );
    // --annotate DIR/: one PNG per photo, at the photo's size.
    let ann = tmp.path().join("annotated");
    let o = run_on(
        &m,
        &dir,
        &[
            "--samples",
            "2",
            "--annotate",
            &format!("{}/", ann.display()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["000000-a.png", "000001-b.png"] {
        let img = image::open(ann.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (256, 256));
    }
    // --sequence: the stills are frames of one scene, so the face keeps its id.
    let o = run_on(&m, &dir, &["--samples", "4", "--sequence"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    assert_eq!(ls[0]["stills"], false);
    let ids = ids_per_frame(&ls);
    assert_eq!(ids[0], ids[1], "{ids:?}");
}

/// Whether ffmpeg can be run here; says SKIPPED (or fails where CI requires it) when not.
fn ffmpeg_or_skip(test: &str) -> bool {
    let ok = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("FER_CAM_REQUIRE_FFMPEG").is_none(),
            "{test}: ffmpeg is required here (FER_CAM_REQUIRE_FFMPEG) but not on PATH"
        );
        common::skip_without(test, "ffmpeg on PATH");
    }
    ok
}

#[test]
fn a_video_file_gives_every_frame_with_media_time() {
    if !ffmpeg_or_skip("a_video_file_gives_every_frame_with_media_time") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let y4m = tmp.path().join("clip.y4m");
    std::fs::write(&y4m, synthetic_y4m(30)).unwrap();
    let mp4 = tmp.path().join("clip.mp4");
    let enc = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&y4m)
        .args(["-c:v", "mpeg4", "-q:v", "2"])
        .arg(&mp4)
        .output()
        .unwrap();
    assert!(
        enc.status.success(),
        "{}",
        String::from_utf8_lossy(&enc.stderr)
    );
    let o = run_on(&m, &mp4, &["--samples", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&o);
    ls.iter().for_each(|l| check_schema(l, 7));
    assert_eq!(ls[0]["type"], "start");
    assert_eq!(ls[0]["source_fps"], 25.0);
    let frames: Vec<&Value> = ls.iter().filter(|l| l["type"] == "frame").collect();
    assert_eq!(frames.len(), 30);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["frame"], i as u64);
        assert!((f["pts_s"].as_f64().unwrap() - i as f64 / 25.0).abs() < 1e-3);
    }
    let s = ls.last().unwrap();
    assert_eq!(
        (s["dropped"].as_u64(), s["media_s"].as_f64()),
        (Some(0), Some(1.2))
    );
    // A file ffmpeg cannot read is one error line naming it, after the summary.
    let bad = tmp.path().join("broken.mp4");
    std::fs::write(&bad, b"\0\0\0\x18ftypmp42 but nothing else").unwrap();
    let o = run_on(&m, &bad, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("broken.mp4") && err.contains("ffmpeg"),
        "{err}"
    );
}

/// Frames in a video file, by ffprobe's count of decoded frames.
fn decoded_frames(clip: &Path) -> u64 {
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(clip)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

#[test]
#[cfg_attr(
    fer_cam_no_shared,
    ignore = "needs ../shared (FER2013 and the shared media) beside the repository"
)]
fn shared_clips_give_every_frame_with_a_face_by_file_and_by_pipe() {
    let Some(media) = shared_media("shared_clips_give_every_frame_with_a_face_by_file_and_by_pipe")
    else {
        return;
    };
    if !ffmpeg_or_skip("shared_clips_give_every_frame_with_a_face_by_file_and_by_pipe") {
        return;
    }
    let check = |name: &str, ls: &[Value], want: u64| {
        let frames: Vec<&Value> = ls.iter().filter(|l| l["type"] == "frame").collect();
        assert_eq!(frames.len() as u64, want, "{name}: frames");
        // Every frame shows a face; none may come out empty because of pacing.
        let empty = frames
            .iter()
            .filter(|f| f["faces"].as_array().unwrap().is_empty())
            .count();
        assert_eq!(empty, 0, "{name}: {empty} frames without a face");
        assert!(frames.iter().all(|f| f["pts_s"].is_number()), "{name}");
        assert_eq!(ls.last().unwrap()["dropped"], 0, "{name}");
    };
    for clip in [
        "man_neutral_to_smile_pyfeat.mp4",
        "woman_expressions_pexels_3063838.mp4",
        "two_faces_side_by_side.mp4",
    ] {
        let path = media.join(clip);
        let want = decoded_frames(&path);
        let o = run(&[
            "run",
            "--input",
            path.to_str().unwrap(),
            "--status-every",
            "0",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        check(clip, &lines(&o), want);
    }
    // README's pipe recipe: ffmpeg writes faster than fer-cam reads, and nothing is lost.
    let clip = media.join("man_neutral_to_smile_pyfeat.mp4");
    let mut ff = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&clip)
        .args(["-f", "yuv4mpegpipe", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let o = Command::new(common::bin())
        .args(["run", "--input", "-", "--status-every", "0"])
        .stdin(ff.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(ff.wait().unwrap().success());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check("pipe", &lines(&o), decoded_frames(&clip));
}

#[test]
fn a_model_that_overflows_gives_no_answer_not_a_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    // Finite weights, each multiplied by 1e30: the activations overflow to inf and NaN.
    let w = m.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let scaled: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("conv") || k.contains("weight") {
                (t * 1e30).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    std::fs::remove_file(&w).unwrap();
    candle_core::safetensors::save(&scaled, &w).unwrap();
    let dir = two_photos_of_one_face(tmp.path());
    let o = run_on(&m, &dir, &["--samples", "4"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("non-finite"), "{err}");
    let ls = lines(&o);
    for l in &ls {
        check_schema(l, 7);
    }
    let warnings: Vec<&Value> = ls
        .iter()
        .filter(|l| l["type"] == "warning" && l["message"].as_str().unwrap().contains("non-finite"))
        .collect();
    assert_eq!(warnings.len(), 2, "{ls:?}");
    // No face line carries a label without probabilities.
    assert!(ls
        .iter()
        .filter(|l| l["type"] == "frame")
        .all(|f| f["faces"].as_array().unwrap().is_empty()));
}

#[test]
fn an_annotation_output_that_fails_fails_the_run_and_counts_what_it_wrote() {
    if !Path::new("/dev/full").exists() {
        common::skip_without(
            "an_annotation_output_that_fails_fails_the_run_and_counts_what_it_wrote",
            "/dev/full",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let clip = tmp.path().join("clip.y4m");
    std::fs::write(&clip, synthetic_y4m(5)).unwrap();
    // /dev/full takes the open and fails every write ("no space left").
    let o = run_on(&m, &clip, &["--samples", "2", "--annotate", "/dev/full"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("annotate: 0 frames written") && err.contains("stopped early"),
        "{err}"
    );
    // The JSON lines are whole all the same.
    let ls = lines(&o);
    assert_eq!(ls.iter().filter(|l| l["type"] == "frame").count(), 5);
}
