//! BlazeFace's boxes against rustface's on a clip: on every fifth frame, each face rustface finds
//! on the full frame is searched again by BlazeFace in the region around it (2× its side, as the
//! face stage does), and the two boxes compared. Prints the side ratio and the centre offsets
//! (fractions of rustface's side) that `BLAZE_SIDE` / `BLAZE_DROP` in `src/face/detect.rs` hold.
//!
//! `cargo run --release --example compare_detectors -- CLIP.y4m`

use fer_cam::capture::{FrameSource, SourceEvent, Y4mSource};
use fer_cam::face::blazeface::{BlazeFace, INPUT};
use fer_cam::face::{sample_square, DetectConfig, FaceDetector};

fn percentiles(mut v: Vec<f32>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f32::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!("p10 {:.3} p50 {:.3} p90 {:.3}", at(0.1), at(0.5), at(0.9))
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: compare_detectors CLIP.y4m"))?;
    let mut src = Y4mSource::new(std::fs::File::open(&path)?, "clip")?;
    let mut det = FaceDetector::new(DetectConfig::default())?;
    let net = BlazeFace::embedded()?;
    let (mut searched, mut n) = (0usize, 0usize);
    let (mut side, mut dx, mut dy) = (Vec::new(), Vec::new(), Vec::new());
    while let SourceEvent::Frame(f) = src.next_event()? {
        n += 1;
        if n % 5 != 0 {
            continue;
        }
        for r in det.detect_full(&f.gray, f.width, f.height) {
            searched += 1;
            let region = 2.0 * r.w.max(r.h);
            let (cx, cy) = r.centre();
            let (x0, y0) = (cx - region / 2.0, cy - region / 2.0);
            let img = sample_square(&f.gray, f.width, f.height, x0, y0, region, INPUT as u32);
            let s = region / INPUT as f32;
            if let Some(b) = net
                .detect(&img, 0.5)?
                .into_iter()
                .max_by(|a, b| a.score.total_cmp(&b.score))
            {
                let (bx, by) = b.centre();
                side.push(b.w * s / r.w);
                dx.push((x0 + bx * s - cx) / r.w);
                dy.push((y0 + by * s - cy) / r.w);
            }
        }
    }
    println!(
        "{path}: {n} frames, {searched} rustface faces, BlazeFace found {}",
        side.len()
    );
    println!("side ratio {}", percentiles(side));
    println!("centre dx {}", percentiles(dx));
    println!("centre dy {}", percentiles(dy));
    Ok(())
}
