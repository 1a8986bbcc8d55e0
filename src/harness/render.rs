//! Rendering a 48x48 test face into a camera-like frame: a cluttered background, the face scaled,
//! rotated and placed at random, then the frame's lighting (gain, gamma), optional downscaling to
//! a webcam's resolution and back, blur and sensor noise. Every draw comes from
//! `(seed, image index)`, so a render is the same on every run and each image's is independent
//! of how many others are rendered.

use image::{imageops::FilterType, GrayImage, Luma, LumaA};
use imageproc::geometric_transformations::{warp_into, Border, Interpolation, Projection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::augment::Camera;
use crate::data::FACE_SIZE;
use crate::error::{Error, Result};
use crate::face::FaceBox;

/// The ranges every rendered frame draws from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderConfig {
    pub seed: u64,
    pub frame_width: u32,
    pub frame_height: u32,
    /// Side of the face square in frame pixels, uniform in this range.
    pub face_min: u32,
    pub face_max: u32,
    /// In-plane rotation, uniform in ±this many degrees.
    pub rotate_deg: f32,
    /// Lighting: `255 · (gain · v/255)^gamma`, each uniform in its range.
    pub gain: (f32, f32),
    pub gamma: (f32, f32),
    /// With this probability the frame is downscaled by a factor uniform in
    /// `[downscale_min, 1]` and scaled back (a lower-resolution camera).
    pub downscale_p: f32,
    pub downscale_min: f32,
    /// Gaussian blur sigma in pixels, uniform in `[0, blur_max]`.
    pub blur_max: f32,
    /// Sensor noise: gray-level standard deviation uniform in `[0, noise_max]`.
    pub noise_max: f32,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            frame_width: 640,
            frame_height: 480,
            face_min: 64,
            face_max: 256,
            rotate_deg: 10.0,
            gain: (0.7, 1.3),
            gamma: (0.8, 1.25),
            downscale_p: 0.3,
            downscale_min: 0.5,
            blur_max: 1.0,
            noise_max: 4.0,
        }
    }
}

impl RenderConfig {
    /// Checks every range before anything is rendered.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(64..=4096).contains(&self.frame_width) || !(64..=4096).contains(&self.frame_height) {
            return bad(format!(
                "render frame {}x{} (each side 64..=4096)",
                self.frame_width, self.frame_height
            ));
        }
        // A face rotated by 45° needs its side times √2 to fit in the frame.
        let fit =
            (self.frame_width.min(self.frame_height) as f32 / std::f32::consts::SQRT_2) as u32;
        if !(16 <= self.face_min && self.face_min <= self.face_max && self.face_max <= fit) {
            return bad(format!(
                "render face sizes {}..{} px (need 16 <= min <= max <= {fit} for this frame)",
                self.face_min, self.face_max
            ));
        }
        let range = |name: &str, (lo, hi): (f32, f32), min: f32, max: f32| {
            if lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "render {name} {lo}..{hi} (allowed within {min}..{max}, low <= high)"
                )))
            }
        };
        range("rotation", (0.0, self.rotate_deg), 0.0, 45.0)?;
        range("gain", self.gain, 0.1, 4.0)?;
        range("gamma", self.gamma, 0.2, 5.0)?;
        range("downscale probability", (0.0, self.downscale_p), 0.0, 1.0)?;
        range("downscale factor", (self.downscale_min, 1.0), 0.1, 1.0)?;
        range("blur", (0.0, self.blur_max), 0.0, 10.0)?;
        range("noise", (0.0, self.noise_max), 0.0, 64.0)?;
        Ok(())
    }
}

/// What one frame drew.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Placement {
    /// Centre and side of the face square in frame pixels (before rotation).
    pub cx: f32,
    pub cy: f32,
    pub side: f32,
    pub angle_deg: f32,
    pub gain: f32,
    pub gamma: f32,
    /// 1.0: not downscaled.
    pub downscale: f32,
    pub blur: f32,
    pub noise: f32,
}

impl Placement {
    /// The face's true square, axis-aligned (what a perfect detector and crop would cut).
    pub fn square(&self) -> FaceBox {
        FaceBox {
            x: self.cx - self.side / 2.0,
            y: self.cy - self.side / 2.0,
            w: self.side,
            h: self.side,
            score: 0.0,
            roll: None,
        }
    }
}

fn uniform(rng: &mut StdRng, (lo, hi): (f32, f32)) -> f32 {
    if hi > lo {
        rng.random_range(lo..=hi)
    } else {
        lo
    }
}

/// A generator of image `index`'s render: stream 0 draws the placement, stream 1 the pixels.
fn rng_for(cfg: &RenderConfig, index: usize, stream: u64) -> StdRng {
    StdRng::seed_from_u64(crate::rngs::mix_seed(&[
        cfg.seed,
        0x7e4d,
        index as u64,
        stream,
    ]))
}

/// Image `index`'s placement and conditions.
pub fn placement(cfg: &RenderConfig, index: usize) -> Placement {
    let mut rng = rng_for(cfg, index, 0);
    let (w, h) = (cfg.frame_width as f32, cfg.frame_height as f32);
    let side = uniform(&mut rng, (cfg.face_min as f32, cfg.face_max as f32));
    let angle_deg = uniform(&mut rng, (-cfg.rotate_deg, cfg.rotate_deg));
    // The rotated square's half extent, so that the whole face stays in the frame.
    let a = angle_deg.to_radians();
    let half = side / 2.0 * (a.cos().abs() + a.sin().abs());
    let cx = uniform(&mut rng, (half, w - half));
    let cy = uniform(&mut rng, (half, h - half));
    let gain = uniform(&mut rng, cfg.gain);
    let gamma = uniform(&mut rng, cfg.gamma);
    let downscale = if rng.random::<f32>() < cfg.downscale_p {
        uniform(&mut rng, (cfg.downscale_min, 1.0))
    } else {
        1.0
    };
    let blur = uniform(&mut rng, (0.0, cfg.blur_max));
    let noise = uniform(&mut rng, (0.0, cfg.noise_max));
    Placement {
        cx,
        cy,
        side,
        angle_deg,
        gain,
        gamma,
        downscale,
        blur,
        noise,
    }
}

/// Renders `face` (48x48 gray) into a frame as image `index` of the set.
pub fn render(cfg: &RenderConfig, index: usize, face: &[u8]) -> Result<(GrayImage, Placement)> {
    let p = placement(cfg, index);
    let Placement {
        gain,
        gamma,
        downscale,
        blur,
        noise,
        ..
    } = p;
    let mut rng = rng_for(cfg, index, 1);
    let mut frame = background(&mut rng, cfg.frame_width, cfg.frame_height);
    paste(&mut frame, face, &p)?;
    let camera = Camera {
        gain,
        gamma,
        downscale,
        blur,
        noise,
    };
    let frame = camera.apply(frame, &mut rng);
    Ok((frame, p))
}

/// A cluttered, unevenly lit background: a coarse random grid of gray levels, bilinearly
/// enlarged, with fine texture.
fn background(rng: &mut StdRng, w: u32, h: u32) -> GrayImage {
    let (gw, gh) = (rng.random_range(3..=9u32), rng.random_range(3..=7u32));
    let coarse = GrayImage::from_fn(gw, gh, |_, _| Luma([rng.random_range(30..=225u8)]));
    let mut bg = image::imageops::resize(&coarse, w, h, FilterType::Triangle);
    for px in bg.pixels_mut() {
        let t: i16 = rng.random_range(-6..=6);
        px.0[0] = (px.0[0] as i16 + t).clamp(0, 255) as u8;
    }
    bg
}

/// Pastes the face, scaled to `p.side` and rotated by `p.angle_deg` about `(p.cx, p.cy)`, with
/// bilinear sampling; its edge blends into the background over about one pixel.
fn paste(frame: &mut GrayImage, face: &[u8], p: &Placement) -> Result<()> {
    let n = FACE_SIZE as u32;
    let src = GrayImage::from_raw(n, n, face.to_vec())
        .ok_or_else(|| Error::Msg(format!("a face of {} bytes is not 48x48", face.len())))?;
    let rgba = image::ImageBuffer::from_fn(n, n, |x, y| LumaA([src.get_pixel(x, y).0[0], 255u8]));
    let half = n as f32 / 2.0;
    let projection = Projection::translate(p.cx, p.cy)
        * Projection::rotate(p.angle_deg.to_radians())
        * Projection::scale(p.side / n as f32, p.side / n as f32)
        * Projection::translate(-half, -half);
    let mut layer = image::ImageBuffer::from_pixel(frame.width(), frame.height(), LumaA([0u8, 0]));
    warp_into(
        &rgba,
        projection,
        Interpolation::Bilinear,
        Border::Constant(LumaA([0, 0])),
        &mut layer,
    );
    for (dst, src) in frame.pixels_mut().zip(layer.pixels()) {
        let a = src.0[1] as f32 / 255.0;
        if a > 0.0 {
            dst.0[0] = (dst.0[0] as f32 * (1.0 - a) + src.0[0] as f32 * a).round() as u8;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face() -> Vec<u8> {
        // A bright square face with a dark left half, so orientation is visible.
        (0..FACE_SIZE * FACE_SIZE)
            .map(|i| if i % FACE_SIZE < 24 { 40 } else { 230 })
            .collect()
    }

    #[test]
    fn renders_are_deterministic_per_seed_and_index() {
        let cfg = RenderConfig::default();
        let (a, pa) = render(&cfg, 3, &face()).unwrap();
        let (b, pb) = render(&cfg, 3, &face()).unwrap();
        assert_eq!(pa, pb);
        assert_eq!(a, b);
        let (c, pc) = render(&cfg, 4, &face()).unwrap();
        assert_ne!(pa, pc);
        assert_ne!(a, c);
        let other = RenderConfig { seed: 1, ..cfg };
        assert_ne!(render(&other, 3, &face()).unwrap().1, pa);
        assert_eq!(placement(&cfg, 3), pa);
    }

    #[test]
    fn the_face_lands_where_the_placement_says() {
        // No lighting change, noise, blur or downscaling: the face's pixels are in its square.
        let cfg = RenderConfig {
            rotate_deg: 0.0,
            gain: (1.0, 1.0),
            gamma: (1.0, 1.0),
            downscale_p: 0.0,
            blur_max: 0.0,
            noise_max: 0.0,
            ..Default::default()
        };
        for i in 0..5 {
            let (frame, p) = render(&cfg, i, &face()).unwrap();
            let sq = p.square();
            assert!(sq.x >= 0.0 && sq.y >= 0.0);
            assert!(sq.x + sq.w <= 640.0 && sq.y + sq.h <= 480.0);
            // A quarter in from the left edge: the dark half; from the right: the bright half.
            let y = p.cy as u32;
            let left = frame.get_pixel((p.cx - p.side / 4.0) as u32, y).0[0];
            let right = frame.get_pixel((p.cx + p.side / 4.0) as u32, y).0[0];
            assert_eq!((left, right), (40, 230), "image {i}: {p:?}");
        }
    }

    #[test]
    fn ranges_are_checked() {
        assert!(RenderConfig::default().validate().is_ok());
        for bad in [
            RenderConfig {
                face_max: 400,
                ..Default::default()
            },
            RenderConfig {
                face_min: 300,
                face_max: 200,
                ..Default::default()
            },
            RenderConfig {
                rotate_deg: 90.0,
                ..Default::default()
            },
            RenderConfig {
                gain: (f32::NAN, 1.0),
                ..Default::default()
            },
            RenderConfig {
                frame_width: 10,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
