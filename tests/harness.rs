//! `fer-cam eval --through-pipeline`: real faces rendered into frames, found by `run`'s face
//! stage, scored; the same seed gives the same report, another seed other renders.

mod common;

/// Where the face is in the 128x128 fixture: x, y, side.
const FACE_IN_FIXTURE: (u32, u32, u32) = (35, 35, 55);

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// The repository's face fixture, cropped to the face as FER2013 frames it and resized to
/// 48x48, as one FER2013 CSV pixel field.
fn fixture_face_48() -> String {
    let big = image::GrayImage::from_raw(128, 128, common::face_fixture_128()).unwrap();
    let (x, y, side) = FACE_IN_FIXTURE;
    let face = image::imageops::crop_imm(&big, x, y, side, side).to_image();
    let small = image::imageops::resize(&face, 48, 48, image::imageops::FilterType::Triangle);
    small
        .pixels()
        .map(|p| p.0[0].to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A CSV whose PublicTest holds the fixture face `n` times (labels cycling), plus one Training
/// row.
fn face_csv(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("faces.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    let px = fixture_face_48();
    writeln!(f, "emotion,pixels,Usage\n3,{px},Training").unwrap();
    for i in 0..n {
        writeln!(f, "{},{px},PublicTest", i % 7).unwrap();
    }
    path
}

fn through_pipeline(csv: &Path, json: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(common::bin())
        .args(["eval", "--data", csv.to_str().unwrap(), "--no-cache"])
        .args(["--split", "PublicTest", "--through-pipeline", "--quiet"])
        .args(["--json", json.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    let stdout = common::stdout_of_success(out);
    assert!(stdout.contains("faces found:"), "{stdout}");
    let mut v = common::read_json(json);
    // Timing differs between runs; nothing else may.
    for k in ["wall_seconds", "faces_per_second"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

#[test]
fn the_harness_is_deterministic_for_a_seed_and_finds_real_faces() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = face_csv(tmp.path(), 12);
    let a = through_pipeline(&csv, &tmp.path().join("a.json"), &[]);
    let b = through_pipeline(&csv, &tmp.path().join("b.json"), &[]);
    assert_eq!(a, b);
    assert_eq!(a["faces"], 12);
    assert_eq!(a["render"]["seed"], 0);
    // A plain frontal face of 64-256 px: rustface finds most of them, and the crops sit on them.
    let found = a["found"].as_u64().unwrap();
    assert!(found >= 9, "{a}");
    let scale = a["crop"]["scale"]["mean"].as_f64().unwrap();
    assert!((0.8..1.25).contains(&scale), "{a}");
    assert!(a["crop"]["iou"]["mean"].as_f64().unwrap() > 0.5, "{a}");
    // Every test face here is the Training row's image: none is unseen.
    assert_eq!(a["unseen_found"]["faces"], 0, "{a}");
    // Another seed draws other frames.
    let c = through_pipeline(&csv, &tmp.path().join("c.json"), &["--render-seed", "5"]);
    assert_eq!(c["render"]["seed"], 5);
    assert_ne!(a["crop"], c["crop"]);
    // Bad ranges are one-line errors before any work.
    let out = Command::new(common::bin())
        .args(["eval", "--data", csv.to_str().unwrap(), "--no-cache"])
        .args(["--split", "PublicTest", "--through-pipeline"])
        .args(["--render-face", "300-100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("render face sizes 300..100"), "{err}");
}
