//! Daemon stages on this machine: face detection on a 640x480 frame (full resolution, downscaled
//! to 320 wide, and the search around a track), the face crop, the CARD sampler (candle ops
//! against the fused kernel, 1/8/32 faces; the encoder is in `benches/encoder.rs`), and whole
//! frames through the pipeline with the shipped model: the 40 recorded frames of
//! `../shared/media/woman_expressions_320x180_2fps.y4m` as they are, at 640x360 and at 1280x360
//! with two faces.
//!
//! `cargo bench --bench pipeline`. Needs ../shared for the real frames; without it, the frame
//! benches say so and are skipped.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fer_cam::capture::clip::{remake_y4m, ClipLayout};
use fer_cam::capture::{FrameSource, Y4mSource};
use fer_cam::face::{crop_face, DetectConfig, FaceDetector, FullDetector, NearDetector};
use fer_cam::infer::Classifier;
use fer_cam::pipeline::{run, RunConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn media() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/media");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("!!! SKIPPED frame benches: ../shared/media not found");
        None
    }
}

/// A 640x480 gray frame with one face (the single-face still, resized).
fn frame_640x480(media: &std::path::Path) -> Vec<u8> {
    let img = fer_cam::capture::color::gray_image(
        image::open(media.join("stills/single_face_pyfeat.jpg")).expect("still"),
    );
    image::imageops::resize(&img, 640, 480, image::imageops::FilterType::Triangle).into_raw()
}

/// A 1920x1080 call gallery: the single-face still shrunk to 384x216 tiles, 5x5.
fn gallery_1080p(media: &std::path::Path) -> Vec<u8> {
    let img = fer_cam::capture::color::gray_image(
        image::open(media.join("stills/single_face_pyfeat.jpg")).expect("still"),
    );
    let tile = image::imageops::resize(&img, 384, 216, image::imageops::FilterType::Triangle);
    let mut out = image::GrayImage::new(1920, 1080);
    for i in 0..25u32 {
        image::imageops::replace(&mut out, &tile, (i % 5 * 384) as i64, (i / 5 * 216) as i64);
    }
    out.into_raw()
}

/// The whole-frame search by each detector, with `run`'s video settings (detection width 320):
/// its cost, and the faces it finds (printed, as the recall beside the time).
fn full_search(c: &mut Criterion) {
    let Some(media) = media() else { return };
    let mut group = c.benchmark_group("full_search/cpu");
    group.sample_size(10);
    let frames = [
        (
            "640x480_1_face",
            frame_640x480(&media),
            640u32,
            480u32,
            1usize,
        ),
        (
            "1920x1080_gallery_25",
            gallery_1080p(&media),
            1920,
            1080,
            25,
        ),
    ];
    for (name, frame, w, h, faces) in &frames {
        for full in [
            FullDetector::Rustface,
            FullDetector::BlazeFace,
            FullDetector::Both,
        ] {
            let mut det = FaceDetector::new(DetectConfig {
                full,
                ..Default::default()
            })
            .expect("detector");
            let found = det.detect_full(frame, *w, *h).len();
            eprintln!("full search {name} {full:?}: {found} faces found of {faces}");
            group.bench_function(format!("{name}/{full:?}"), |b| {
                b.iter(|| det.detect_full(frame, *w, *h))
            });
        }
    }
    group.finish();
}

fn detect(c: &mut Criterion) {
    let Some(media) = media() else { return };
    let frame = frame_640x480(&media);
    let mut group = c.benchmark_group("face/cpu");
    group.sample_size(20);
    for width in [0u32, 320] {
        let mut det = FaceDetector::new(DetectConfig {
            detect_width: width,
            full: FullDetector::Rustface,
            ..Default::default()
        })
        .expect("detector");
        let faces = det.detect_full(&frame, 640, 480);
        assert!(!faces.is_empty(), "no face found in the bench frame");
        let name = if width == 0 {
            "detect_640x480_full".to_string()
        } else {
            format!("detect_640x480_at_{width}")
        };
        group.bench_function(&name, |b| b.iter(|| det.detect_full(&frame, 640, 480)));
        if width == 320 {
            let face = faces[0];
            for near in [NearDetector::Rustface, NearDetector::BlazeFace] {
                let mut det = FaceDetector::new(DetectConfig {
                    near,
                    ..Default::default()
                })
                .expect("detector");
                assert!(det.detect_near(&frame, 640, 480, &face).is_some());
                group.bench_function(format!("detect_near_track/{near:?}"), |b| {
                    b.iter(|| det.detect_near(&frame, 640, 480, &face))
                });
            }
            group.bench_function("crop_48x48", |b| {
                b.iter(|| crop_face(&frame, 640, 480, &face, 0.1, 48))
            });
        }
    }
    group.finish();
}

/// The shipped model's CARD sampler, 32 samples × 10 steps per face: candle ops (the
/// reference) against the fused kernel, for 1, 8 and 32 faces.
fn sampler(c: &mut Criterion) {
    let clf = Classifier::load_embedded(&Device::Cpu).expect("embedded model");
    let model = clf.model();
    let fused = model.card.fused(model.schedule()).expect("fold");
    let mut group = c.benchmark_group("card_sampler/cpu");
    for faces in [1usize, 8, 32] {
        let feats = Tensor::randn(0f32, 1.0, (faces, fused.feat_dim), &Device::Cpu)
            .expect("feats")
            .relu()
            .expect("relu");
        let f = candle_nn::ops::softmax(&model.head_logits(&feats).expect("head"), D::Minus1)
            .expect("softmax");
        let (feats_v, f_v) = (
            feats
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v"),
            f.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v"),
        );
        let mut rngs: Vec<_> = (0..faces as u64)
            .map(|i| fer_cam::rngs::keyed_rng(&[0, i]))
            .collect();
        let param = format!("faces{faces}_samples32_steps10");
        group.bench_function(BenchmarkId::new("candle", &param), |b| {
            b.iter(|| model.sample(&feats, &f, 32, 10, &mut rngs).expect("sample"))
        });
        group.bench_function(BenchmarkId::new("fused", &param), |b| {
            b.iter(|| fused.sample(&feats_v, &f_v, 32, 10, &mut rngs))
        });
    }
    group.finish();
}

/// Whole frames through the daemon's pipeline (capture, face stage, inference with the shipped
/// model and its views, emit) on the 40 frames of the shared clip: as recorded (320x180), resized
/// to 640x360 (one face) and set twice side by side at 1280x360 (two faces, one mirrored).
/// Files are read as fast as they go, so the full-frame search runs in line every third frame:
/// time per iteration / 40 is the mean cost of a frame, not its latency (`fer-cam run --realtime
/// --stats` measures that).
fn end_to_end(c: &mut Criterion) {
    let Some(media) = media() else { return };
    let clip = std::fs::read(media.join("woman_expressions_320x180_2fps.y4m")).expect("clip");
    let remade = |width, height, copies| {
        let mut out = Vec::new();
        let layout = ClipLayout {
            width,
            height,
            fps: 2,
            repeat: 1,
            copies,
        };
        remake_y4m(&clip[..], "clip", layout, &mut out).expect("remake");
        out
    };
    let clips = [
        ("320x180_one_face", clip.clone()),
        ("640x360_one_face", remade(640, 360, 1)),
        ("1280x360_two_faces", remade(640, 360, 2)),
    ];
    let clf = Classifier::load_embedded(&Device::Cpu).expect("embedded model");
    let mut group = c.benchmark_group("pipeline/cpu");
    group.sample_size(10);
    for (name, data) in clips {
        group.bench_function(format!("40_frames/{name}"), |b| {
            b.iter(|| {
                let data = data.clone();
                let open = move || -> fer_cam::Result<Box<dyn FrameSource>> {
                    Ok(Box::new(Y4mSource::new(
                        std::io::Cursor::new(data),
                        "bench",
                    )?))
                };
                let cfg = RunConfig {
                    status_every: 0.0,
                    ..Default::default()
                };
                let stats = run(
                    &cfg,
                    open,
                    clf.clone(),
                    std::io::sink(),
                    Arc::new(AtomicBool::new(false)),
                )
                .expect("run");
                assert_eq!(stats.frames, 40);
                stats
            })
        });
    }
    group.finish();
}

criterion_group!(benches, detect, full_search, sampler, end_to_end);
criterion_main!(benches);
