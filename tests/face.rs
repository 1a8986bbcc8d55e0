//! The face stage on real faces: the search around a track (rustface's and BlazeFace's) finds the
//! face the full-frame search found, after it moved or changed size, and nothing where no face
//! is.

mod common;

use fer_cam::face::{DetectConfig, FaceBox, FaceDetector, NearDetector};

/// The single-face still as a 640x480 gray frame, shifted by (dx, dy) and scaled by `zoom`
/// about its centre.
fn frame(still: &image::GrayImage, dx: f32, dy: f32, zoom: f32) -> Vec<u8> {
    let base = image::imageops::resize(still, 640, 480, image::imageops::FilterType::Triangle);
    let mut out = vec![0u8; 640 * 480];
    for y in 0..480u32 {
        for x in 0..640u32 {
            let sx = ((x as f32 - 320.0 - dx) / zoom + 320.0).round();
            let sy = ((y as f32 - 240.0 - dy) / zoom + 240.0).round();
            if (0.0..640.0).contains(&sx) && (0.0..480.0).contains(&sy) {
                out[(y * 640 + x) as usize] = base.get_pixel(sx as u32, sy as u32)[0];
            }
        }
    }
    out
}

/// The single-face still from ../shared, or where that is absent the repository's 128x128
/// fixture of the same photo.
fn still() -> image::GrayImage {
    match common::shared_dir() {
        Some(shared) => fer_cam::capture::color::gray_image(
            image::open(shared.join("media/stills/single_face_pyfeat.jpg")).unwrap(),
        ),
        None => {
            eprintln!("!!! ../shared absent: the face-stage test uses the 128x128 fixture");
            image::GrayImage::from_raw(128, 128, common::face_fixture_128()).unwrap()
        }
    }
}

#[test]
fn the_search_around_a_track_follows_the_face() {
    for near in [NearDetector::Rustface, NearDetector::BlazeFace] {
        follows_the_face(near);
    }
}

fn follows_the_face(near: NearDetector) {
    let still = still();
    let mut det = FaceDetector::new(DetectConfig {
        near,
        ..Default::default()
    })
    .unwrap();
    let f0 = frame(&still, 0.0, 0.0, 1.0);
    let found = det.detect_full(&f0, 640, 480);
    assert_eq!(found.len(), 1, "{found:?}");
    let track = found[0];
    // The same frame, then the face moved by a tenth of its size, nearer and farther.
    let side = track.w;
    for (dx, dy, zoom) in [
        (0.0, 0.0, 1.0),
        (0.1 * side, -0.05 * side, 1.0),
        (0.0, 0.0, 1.15),
        (0.0, 0.0, 0.85),
    ] {
        let f = frame(&still, dx, dy, zoom);
        let (cx, cy) = track.centre();
        let want = FaceBox {
            x: (cx - 320.0) * zoom + 320.0 + dx - track.w * zoom / 2.0,
            y: (cy - 240.0) * zoom + 240.0 + dy - track.h * zoom / 2.0,
            w: track.w * zoom,
            h: track.h * zoom,
            score: 0.0,
            roll: None,
        };
        let got = det
            .detect_near(&f, 640, 480, &track)
            .unwrap_or_else(|| panic!("{near:?} lost the face at {dx},{dy} x{zoom}"));
        assert!(
            got.iou(&want) > 0.6,
            "{near:?} {dx},{dy} x{zoom}: {got:?} vs {want:?}"
        );
    }
    // A blank frame: nothing.
    assert!(det
        .detect_near(&vec![128u8; 640 * 480], 640, 480, &track)
        .is_none());
}
