//! BlazeFace on fer-cam's own CPU code against onnxruntime running the original ONNX graph
//! (`scripts/convert_blazeface.py` wrote the fixture): same raw outputs on a real face, and the
//! decoded face where it is.

mod common;

use common::face_fixture_128;
use fer_cam::face::blazeface::{BlazeFace, ANCHORS, INPUT};

fn reference_outputs() -> (Vec<f32>, Vec<f32>) {
    let raw = std::fs::read("tests/fixtures/blazeface_outputs.bin").unwrap();
    let v: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(v.len(), ANCHORS * 17);
    let (l, r) = v.split_at(ANCHORS);
    (l.to_vec(), r.to_vec())
}

#[test]
fn raw_outputs_match_onnxruntime() {
    let img = face_fixture_128();
    assert_eq!(img.len(), INPUT * INPUT);
    let net = BlazeFace::embedded().unwrap();
    let (logits, regs) = net.forward(&img).unwrap();
    let (ref_logits, ref_regs) = reference_outputs();
    let worst = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0f32, f32::max)
    };
    assert!(
        worst(&logits, &ref_logits) < 1e-3,
        "{}",
        worst(&logits, &ref_logits)
    );
    assert!(
        worst(&regs, &ref_regs) < 1e-3,
        "{}",
        worst(&regs, &ref_regs)
    );
}

#[test]
fn finds_the_one_face_of_the_fixture() {
    let net = BlazeFace::embedded().unwrap();
    let faces = net.detect(&face_fixture_128(), 0.5).unwrap();
    assert_eq!(faces.len(), 1, "{faces:?}");
    let f = faces[0];
    // The face, by eye: centred near (62, 65), about 45 px across.
    let (cx, cy) = f.centre();
    assert!((cx - 62.0).abs() < 8.0 && (cy - 65.0).abs() < 8.0, "{f:?}");
    assert!((35.0..60.0).contains(&f.w), "{f:?}");
    assert!(f.score > 0.75);
    // A blank image has none.
    assert!(net.detect(&[128u8; INPUT * INPUT], 0.5).unwrap().is_empty());
}
