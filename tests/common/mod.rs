//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// The largest absolute difference between two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The largest absolute difference between two tensors of one shape, relative to the largest
/// magnitude of `want` (at least 1e-6).
pub fn rel_err(got: &candle_core::Tensor, want: &candle_core::Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    let d = diff.to_scalar::<f32>().unwrap();
    d / scale.to_scalar::<f32>().unwrap().max(1e-6)
}

/// `../shared` next to the repository, if this checkout has it.
pub fn shared_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    p.is_dir().then_some(p)
}

/// The repository's 128x128 gray face (`tests/fixtures/blazeface_input.pgm`, binary PGM), as
/// row-major bytes.
pub fn face_fixture_128() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blazeface_input.pgm");
    let pgm = std::fs::read(path).unwrap();
    let header = b"P5\n128 128\n255\n";
    assert!(pgm.starts_with(header), "not a 128x128 8-bit PGM");
    let px = pgm[header.len()..].to_vec();
    assert_eq!(px.len(), 128 * 128);
    px
}

/// Says loudly that a test could not run its part that needs a program or device this machine
/// lacks (`node`, `/dev/full`); the caller decides whether that is allowed.
pub fn skip_without(test: &str, what: &str) {
    eprintln!("\n!!! SKIPPED {test}: {what} not found on this machine\n");
}

/// Says loudly that a test could not run its real-data part; under `FER_CAM_REQUIRE_DATA=1`
/// (CI, which has `../shared`) a missing file fails the test instead.
pub fn skip_loudly(test: &str, what: &Path) {
    assert!(
        std::env::var_os("FER_CAM_REQUIRE_DATA").is_none(),
        "{test}: {} is required here (FER_CAM_REQUIRE_DATA) but missing",
        what.display()
    );
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED {test}: {} not found (needs ../shared beside the repo)\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
        what.display()
    );
}

/// One CSV row with deterministic pseudo-random pixels.
pub fn csv_row(label: u8, usage: &str, seed: u32) -> String {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let pixels: Vec<String> = (0..2304)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 256).to_string()
        })
        .collect();
    format!("{label},{},{usage}\n", pixels.join(" "))
}

/// A small FER2013-layout CSV: `per_split` rows for each of the three splits, labels cycling.
pub fn write_fer_csv(path: &Path, per_split: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(b"emotion,pixels,Usage\n").unwrap();
    let mut seed = 1;
    for usage in ["Training", "PublicTest", "PrivateTest"] {
        for i in 0..per_split {
            f.write_all(csv_row((i % 7) as u8, usage, seed).as_bytes())
                .unwrap();
            seed += 1;
        }
    }
}

/// Path of the built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fer-cam")
}

/// Asserts that a finished command succeeded (showing its stderr if not) and returns its stdout.
pub fn stdout_of_success(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
