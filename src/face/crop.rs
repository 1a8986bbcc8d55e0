//! Face crops at the classifier's input size: a square around the box, clamped to the frame,
//! resized with a triangle filter. Written out here (rather than through `image`'s resize,
//! whose arithmetic it reproduces step for step, checked in the tests) because the GPU crop
//! kernel (`src/cuda/kernels.cu`, `crop_faces`) is its twin and must be able to match it.

use super::FaceBox;

/// The square a crop of `b` takes from the frame: `(x0, y0, side)` in whole pixels, the box's
/// longer side enlarged by `margin` (a fraction of the side on each side), about its centre.
pub fn crop_square(b: &FaceBox, margin: f32) -> (i64, i64, i64) {
    let s = b.w.max(b.h) * (1.0 + 2.0 * margin);
    let (cx, cy) = b.centre();
    let n = (s.round() as i64).max(1);
    let x0 = (cx - s / 2.0).round() as i64;
    let y0 = (cy - s / 2.0).round() as i64;
    (x0, y0, n)
}

/// The square a crop of `b` takes ([`crop_square`]), as a box (no score, no roll).
pub fn crop_box(b: &FaceBox, margin: f32) -> FaceBox {
    let (x0, y0, n) = crop_square(b, margin);
    FaceBox {
        x: x0 as f32,
        y: y0 as f32,
        w: n as f32,
        h: n as f32,
        score: 0.0,
        roll: None,
    }
}

/// Roll the classifier copes with unturned, in radians (8°): it was trained with random
/// rotations of up to ±10°, and FER2013's faces carry their own small tilts. A crop is turned
/// only by the part of the roll beyond this, so small rolls and the eye positions' noise leave
/// it upright, and the turn grows from zero without a jump. On PublicTest renders (600 faces,
/// `eval --through-pipeline --limit 600`, accuracy over the faces found): at ±25° of roll,
/// turning by the whole roll 63.6%, by the part beyond 8° 63.1%, not at all 62.2%; at ±10°,
/// 62.2%, 62.7% and 62.6% (differences of a point are within this sample's noise; the large
/// rolls are what the turn is for).
pub const ROLL_LEFT_UPRIGHT: f32 = 8.0 * std::f32::consts::PI / 180.0;

/// The turn a crop of a box with `roll` gets (radians): the part of the roll beyond
/// [`ROLL_LEFT_UPRIGHT`], or none for an unknown or non-finite roll.
pub fn crop_turn(roll: Option<f32>) -> f32 {
    match roll {
        Some(r) if r.is_finite() => r - r.clamp(-ROLL_LEFT_UPRIGHT, ROLL_LEFT_UPRIGHT),
        _ => 0.0,
    }
}

/// A square crop around `b` enlarged by `margin` (fraction of the side on each side), clamped to
/// the frame (edge pixels repeat), resized to `side × side`. A box with a roll is cropped
/// turned by it about the square's centre, so the eyes come out level. A frame buffer that does
/// not match `w × h` (or is empty) gives a blank crop.
pub fn crop_face(gray: &[u8], w: u32, h: u32, b: &FaceBox, margin: f32, side: u32) -> Vec<u8> {
    let (w, h, out) = (w as usize, h as usize, side as usize);
    if gray.len() != w * h || w == 0 || h == 0 {
        return vec![0; out * out];
    }
    let (x0, y0, n) = crop_square(b, margin);
    let turn = crop_turn(b.roll);
    // Under about half a degree no pixel of a 48-px crop moves by a fifth of a pixel.
    match Some(turn).filter(|t| t.abs() >= 0.008) {
        None => {
            // Pixel (i, j) of the square, clamped into the frame.
            let px = |i: usize, j: usize| {
                let x = (x0 + i as i64).clamp(0, w as i64 - 1) as usize;
                let y = (y0 + j as i64).clamp(0, h as i64 - 1) as usize;
                gray[y * w + x] as f32
            };
            resize_square(px, n as usize, out)
        }
        Some(turn) => {
            let square = turned_square(gray, w, h, (x0, y0, n), turn);
            let n = n as usize;
            resize_square(|i, j| square[j * n + i], n, out)
        }
    }
}

/// The `n × n` square at `(x0, y0)` turned by `roll` about its centre, sampled bilinearly from
/// the frame (edge pixels repeat outside it): pixel (i, j) is read at the centre plus the
/// offset `(i, j)` has from the centre, rotated by `roll`.
fn turned_square(
    gray: &[u8],
    w: usize,
    h: usize,
    (x0, y0, n): (i64, i64, i64),
    roll: f32,
) -> Vec<f32> {
    let half = n as f32 / 2.0;
    let (cx, cy) = (x0 as f32 + half, y0 as f32 + half);
    let (sin, cos) = roll.sin_cos();
    let n = n as usize;
    let mut square = Vec::with_capacity(n * n);
    for j in 0..n {
        let v = j as f32 + 0.5 - half;
        for i in 0..n {
            let u = i as f32 + 0.5 - half;
            // Pixel centres sit at +0.5: the sample position in pixel-index coordinates.
            let (sx, sy) = (cx + u * cos - v * sin - 0.5, cy + u * sin + v * cos - 0.5);
            square.push(bilinear(gray, w, h, sx, sy));
        }
    }
    square
}

/// The frame's grey level at `(sx, sy)` in pixel-index coordinates (pixel `(x, y)` at `x`, `y`),
/// interpolated bilinearly from its four neighbours; positions outside the frame are clamped to
/// its edge. The face stage's one bilinear sampler (crops turned by the roll, and the squares
/// the detectors search, [`super::sample_square`]). `gray` must hold `w·h > 0` pixels.
pub(crate) fn bilinear(gray: &[u8], w: usize, h: usize, sx: f32, sy: f32) -> f32 {
    let at = |x: usize, y: usize| gray[y * w + x] as f32;
    let sx = sx.clamp(0.0, (w - 1) as f32);
    let sy = sy.clamp(0.0, (h - 1) as f32);
    let (xa, ya) = (sx.floor() as usize, sy.floor() as usize);
    let (xb, yb) = ((xa + 1).min(w - 1), (ya + 1).min(h - 1));
    let (fx, fy) = (sx - xa as f32, sy - ya as f32);
    let top = at(xa, ya) + fx * (at(xb, ya) - at(xa, ya));
    let bottom = at(xa, yb) + fx * (at(xb, yb) - at(xa, yb));
    top + fy * (bottom - top)
}

/// The `n × n` square whose pixel (i, j) is `px(i, j)`, resized to `out × out` with a triangle
/// filter and rounded to grey levels.
fn resize_square(px: impl Fn(usize, usize) -> f32, n: usize, out: usize) -> Vec<u8> {
    if n == out {
        return (0..out * out)
            .map(|k| px(k % out, k / out).clamp(0.0, 255.0).round() as u8)
            .collect();
    }
    let taps: Vec<Taps> = (0..out).map(|o| Taps::new(o, n, out)).collect();
    // Rows first: each output row as a weighted sum of the square's rows, over all n columns.
    let mut rows = vec![0f32; out * n];
    for (oy, t) in taps.iter().enumerate() {
        for x in 0..n {
            let mut acc = 0f32;
            for (k, wt) in t.weights.iter().enumerate() {
                acc += px(x, t.left + k) * wt;
            }
            rows[oy * n + x] = acc;
        }
    }
    // Then columns, rounded to the nearest grey level (halves away from zero).
    let mut crop = Vec::with_capacity(out * out);
    for oy in 0..out {
        let row = &rows[oy * n..(oy + 1) * n];
        for t in &taps {
            let mut acc = 0f32;
            for (k, wt) in t.weights.iter().enumerate() {
                acc += row[t.left + k] * wt;
            }
            crop.push(acc.clamp(0.0, 255.0).round() as u8);
        }
    }
    crop
}

/// The source pixels `left..left + weights.len()` that output `o` of `out` reads from a line of
/// `n`, and their normalised triangle weights (support scaled by the ratio when shrinking).
struct Taps {
    left: usize,
    weights: Vec<f32>,
}

impl Taps {
    fn new(o: usize, n: usize, out: usize) -> Self {
        let ratio = n as f32 / out as f32;
        let sratio = if ratio < 1.0 { 1.0 } else { ratio };
        let support = sratio;
        let centre = (o as f32 + 0.5) * ratio;
        let left = ((centre - support).floor() as i64).clamp(0, n as i64 - 1);
        let right = ((centre + support).ceil() as i64).clamp(left + 1, n as i64);
        let centre = centre - 0.5;
        let mut weights: Vec<f32> = (left..right)
            .map(|i| triangle((i as f32 - centre) / sratio))
            .collect();
        let mut sum = 0f32;
        for w in &weights {
            sum += w;
        }
        for w in &mut weights {
            *w /= sum;
        }
        Self {
            left: left as usize,
            weights,
        }
    }
}

fn triangle(x: f32) -> f32 {
    if x.abs() < 1.0 {
        1.0 - x.abs()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::FilterType;
    use image::GrayImage;

    fn face(x: f32, y: f32, side: f32) -> FaceBox {
        FaceBox {
            x,
            y,
            w: side,
            h: side,
            score: 5.0,
            roll: None,
        }
    }

    #[test]
    fn crop_is_square_resized_and_clamped() {
        let (w, h) = (100u32, 60u32);
        let gray: Vec<u8> = (0..w * h).map(|i| (i % w) as u8).collect();
        let c = crop_face(&gray, w, h, &face(80.0, 40.0, 30.0), 0.1, 48);
        assert_eq!(c.len(), 48 * 48);
        // The right part lies outside the frame: clamped to the last column (99).
        assert_eq!(c[47], 99);
        assert!(c[0] < 80);
        // A buffer that does not match the frame gives a blank crop, not a panic.
        assert_eq!(
            crop_face(&gray[1..], w, h, &face(0.0, 0.0, 9.0), 0.1, 4),
            [0; 16]
        );
        assert_eq!(crop_face(&[], 0, 0, &face(0.0, 0.0, 9.0), 0.1, 2), [0; 4]);
    }

    /// The crop equals `image`'s triangle resize of the clamped square, byte for byte, when
    /// shrinking, enlarging and at the same size.
    #[test]
    fn crop_matches_image_resize() {
        let (w, h) = (160u32, 120u32);
        let mut state = 12345u32;
        let gray: Vec<u8> = (0..w * h)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (state >> 16) as u8
            })
            .collect();
        for (b, side) in [
            (face(30.3, 20.7, 97.0), 48),
            (face(-12.0, 70.0, 61.4), 48),
            (face(140.0, 100.0, 13.0), 48),
            (face(50.0, 50.0, 40.0), 48),
            (face(10.0, 10.0, 33.0), 17),
        ] {
            let (x0, y0, n) = crop_square(&b, 0.1);
            let sq: Vec<u8> = (0..n * n)
                .map(|k| {
                    let x = (x0 + k % n).clamp(0, w as i64 - 1) as u32;
                    let y = (y0 + k / n).clamp(0, h as i64 - 1) as u32;
                    gray[(y * w + x) as usize]
                })
                .collect();
            let img = GrayImage::from_raw(n as u32, n as u32, sq).unwrap();
            let want = image::imageops::resize(&img, side, side, FilterType::Triangle).into_raw();
            assert_eq!(
                crop_face(&gray, w, h, &b, 0.1, side),
                want,
                "{b:?} -> {side}"
            );
        }
    }
}
