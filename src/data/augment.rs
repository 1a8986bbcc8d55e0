//! Training augmentations for 48x48 gray faces, as used by strong FER2013 baselines: random
//! resized crop, horizontal flip, small rotation, brightness/contrast jitter and random erasing.
//! Geometry goes through `image`/`imageproc`; the randomness comes from the caller's RNG so a
//! seeded run is reproducible.

use image::imageops::FilterType;
use image::GrayImage;
use imageproc::geometric_transformations::{rotate_about_center, Border, Interpolation};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::FACE_SIZE;

/// Augmentation strengths. `Augment::none()` leaves images untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Side of the random square crop as a fraction of 48, drawn from this range, then resized
    /// back to 48 (1.0..1.0 disables cropping).
    pub crop_min: f32,
    pub crop_max: f32,
    /// Probability of a horizontal flip.
    pub flip: f32,
    /// Largest rotation in degrees (uniform in ±this).
    pub rotate_deg: f32,
    /// Brightness shift (fraction of 255) and contrast factor range ±this.
    pub brightness: f32,
    pub contrast: f32,
    /// Probability of erasing one random rectangle (2–33% of the area) with noise.
    pub erase: f32,
    /// Camera conditions the face stage brings (all off unless set; see [`Webcam`]).
    pub webcam: Webcam,
}

/// Augmentations for faces that reach the classifier through a camera and the face stage
/// rather than as FER2013's own crops: the detector's framing (its crop square is the true one
/// scaled and shifted), a lower-resolution camera, blur, sensor noise and lighting gamma. Each is
/// off at 0; `eval --through-pipeline` measures the spread they imitate (crop side 0.94 ± 0.15
/// of the true side, centre ± 0.05-0.06 of the side with the default face stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Webcam {
    /// Standard deviation of the crop side's factor (around 1) and of its centre's offset (a
    /// fraction of the side); a crop larger than the image repeats its edge pixels.
    pub framing_scale_sd: f32,
    pub framing_shift_sd: f32,
    /// Probability of taking the image down to a lower resolution (factor uniform in
    /// `downscale_min..1`) and back.
    pub downscale_p: f32,
    pub downscale_min: f32,
    /// Largest Gaussian blur sigma in pixels of the 48x48 image (uniform in `0..blur_max`).
    pub blur_max: f32,
    /// Largest sensor-noise standard deviation in gray levels (uniform in `0..noise_max`).
    pub noise_max: f32,
    /// Lighting gamma range `gamma_lo..gamma_hi` (`255·(v/255)^gamma`; 0..0 is off).
    pub gamma_lo: f32,
    pub gamma_hi: f32,
}

/// One 48x48 image's row-major gray bytes as an image (black if they are not 48x48).
fn face_image(pixels: &[u8]) -> GrayImage {
    let side = FACE_SIZE as u32;
    GrayImage::from_raw(side, side, pixels.to_vec()).unwrap_or_else(|| GrayImage::new(side, side))
}

impl Webcam {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f32, hi: f32| v.is_finite() && (0.0..=hi).contains(&v);
        if !ok(self.framing_scale_sd, 0.5) || !ok(self.framing_shift_sd, 0.5) {
            return Err("augment webcam framing_*_sd in 0..=0.5".into());
        }
        if !ok(self.downscale_p, 1.0)
            || !(self.downscale_p == 0.0
                || ok(self.downscale_min, 1.0) && self.downscale_min >= 0.1)
        {
            return Err("augment webcam downscale_p in 0..=1, downscale_min in 0.1..=1".into());
        }
        if !ok(self.blur_max, 5.0) || !ok(self.noise_max, 64.0) {
            return Err("augment webcam blur_max in 0..=5, noise_max in 0..=64".into());
        }
        let gamma_off = self.gamma_lo == 0.0 && self.gamma_hi == 0.0;
        let gamma_ok =
            self.gamma_lo > 0.0 && self.gamma_lo <= self.gamma_hi && self.gamma_hi <= 4.0;
        if !(gamma_off || gamma_ok) {
            return Err(
                "augment webcam gamma_lo..gamma_hi within 0 < lo <= hi <= 4 (or both 0: off)"
                    .into(),
            );
        }
        Ok(())
    }

    /// [`Webcam::apply`] on one 48x48 image's row-major gray bytes.
    pub fn apply_to<R: Rng>(&self, pixels: &[u8], rng: &mut R) -> Vec<u8> {
        self.apply(face_image(pixels), rng).into_raw()
    }

    /// Applies the enabled conditions to `img` (48x48); draws nothing for those that are off,
    /// so a config without them trains exactly as before.
    fn apply<R: Rng>(&self, img: GrayImage, rng: &mut R) -> GrayImage {
        let side = img.width();
        let mut img = img;
        if self.framing_scale_sd > 0.0 || self.framing_shift_sd > 0.0 {
            let mut normal = || rng.sample::<f32, _>(rand_distr::StandardNormal);
            let scale = (1.0 + self.framing_scale_sd * normal()).clamp(0.6, 1.6);
            let (dx, dy) = (
                self.framing_shift_sd * normal(),
                self.framing_shift_sd * normal(),
            );
            let n = side as f32;
            let s = n * scale;
            let (x0, y0) = (n / 2.0 + dx * n - s / 2.0, n / 2.0 + dy * n - s / 2.0);
            let px = crate::face::sample_square(img.as_raw(), side, side, x0, y0, s, side);
            img = GrayImage::from_raw(side, side, px).expect("side x side");
        }
        // A condition that is off keeps its neutral value and draws nothing.
        let mut draw = |on: bool, lo: f32, hi: f32, off: f32| {
            if on {
                rng.random_range(lo..=hi)
            } else {
                off
            }
        };
        let downscale_on = self.downscale_p > 0.0 && draw(true, 0.0, 1.0, 1.0) < self.downscale_p;
        let camera = Camera {
            gain: 1.0,
            gamma: draw(self.gamma_hi > 0.0, self.gamma_lo, self.gamma_hi, 1.0),
            downscale: draw(downscale_on, self.downscale_min, 1.0, 1.0),
            blur: draw(self.blur_max > 0.0, 0.0, self.blur_max, 0.0),
            noise: draw(self.noise_max > 0.0, 0.0, self.noise_max, 0.0),
        };
        camera.apply(img, rng)
    }
}

/// What a camera does to a picture, drawn already: lighting `255·(gain·v/255)^gamma`, a
/// resolution `downscale` times lower and back, a Gaussian blur of sigma `blur` (none under
/// 0.05) and sensor noise of standard deviation `noise` gray levels, in that order. Training's
/// [`Webcam`] augmentation and `eval --through-pipeline`'s renders both use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Camera {
    pub gain: f32,
    pub gamma: f32,
    pub downscale: f32,
    pub blur: f32,
    pub noise: f32,
}

impl Camera {
    /// `img` as this camera sees it (noise drawn from `rng`, only when `noise > 0`).
    pub fn apply<R: Rng>(&self, img: GrayImage, rng: &mut R) -> GrayImage {
        let (w, h) = img.dimensions();
        let mut img = img;
        let lut: Vec<u8> = (0..256)
            .map(|v| {
                (255.0 * (self.gain * v as f32 / 255.0).min(1.0).powf(self.gamma)).round() as u8
            })
            .collect();
        for px in img.pixels_mut() {
            px.0[0] = lut[px.0[0] as usize];
        }
        if self.downscale < 1.0 {
            let (dw, dh) = (
                ((w as f32 * self.downscale).round() as u32).max(16),
                ((h as f32 * self.downscale).round() as u32).max(16),
            );
            let small = image::imageops::resize(&img, dw, dh, FilterType::Triangle);
            img = image::imageops::resize(&small, w, h, FilterType::Triangle);
        }
        if self.blur > 0.05 {
            img = imageproc::filter::gaussian_blur_f32(&img, self.blur);
        }
        if self.noise > 0.0 {
            if let Ok(dist) = rand_distr::Normal::new(0.0f32, self.noise) {
                for px in img.pixels_mut() {
                    px.0[0] = (px.0[0] as f32 + rand_distr::Distribution::sample(&dist, rng))
                        .round()
                        .clamp(0.0, 255.0) as u8;
                }
            }
        }
        img
    }
}

impl Default for Augment {
    fn default() -> Self {
        Self::supervised()
    }
}

impl Augment {
    /// No change at all.
    pub fn none() -> Self {
        Self {
            crop_min: 1.0,
            crop_max: 1.0,
            flip: 0.0,
            rotate_deg: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            erase: 0.0,
            webcam: Webcam::default(),
        }
    }

    /// For the supervised classifier: crops of 40–48 px, flips, ±10°, light jitter, erasing.
    pub fn supervised() -> Self {
        Self {
            crop_min: 40.0 / 48.0,
            crop_max: 1.0,
            flip: 0.5,
            rotate_deg: 10.0,
            brightness: 0.1,
            contrast: 0.1,
            erase: 0.5,
            webcam: Webcam::default(),
        }
    }

    /// For Barlow Twins views: wider crops and stronger photometric jitter.
    pub fn ssl() -> Self {
        Self {
            crop_min: 0.6,
            crop_max: 1.0,
            flip: 0.5,
            rotate_deg: 15.0,
            brightness: 0.3,
            contrast: 0.3,
            erase: 0.3,
            webcam: Webcam::default(),
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |v: f32| (0.0..=1.0).contains(&v);
        if !(self.crop_min > 0.0 && self.crop_min <= self.crop_max && self.crop_max <= 1.0) {
            return Err(format!(
                "augment crop {}..{} (need 0 < crop_min <= crop_max <= 1)",
                self.crop_min, self.crop_max
            ));
        }
        if !unit(self.flip) || !unit(self.erase) {
            return Err("augment flip and erase are probabilities in 0..=1".into());
        }
        if !(0.0..=180.0).contains(&self.rotate_deg) {
            return Err(format!(
                "augment rotate_deg {} (allowed 0..=180)",
                self.rotate_deg
            ));
        }
        if !unit(self.brightness) || !unit(self.contrast) {
            return Err("augment brightness and contrast are in 0..=1".into());
        }
        self.webcam.validate()
    }

    /// Applies the augmentations to one 48x48 image (row-major gray bytes).
    pub fn apply<R: Rng>(&self, pixels: &[u8], rng: &mut R) -> Vec<u8> {
        let side = FACE_SIZE as u32;
        let mut img = face_image(pixels);
        if self.crop_min < 1.0 {
            let frac = rng.random_range(self.crop_min..=self.crop_max);
            let c = ((frac * side as f32).round() as u32).clamp(8, side);
            let (x0, y0) = (
                rng.random_range(0..=side - c),
                rng.random_range(0..=side - c),
            );
            let crop = image::imageops::crop_imm(&img, x0, y0, c, c).to_image();
            img = image::imageops::resize(&crop, side, side, FilterType::Triangle);
        }
        if rng.random::<f32>() < self.flip {
            image::imageops::flip_horizontal_in_place(&mut img);
        }
        img = self.webcam.apply(img, rng);
        if self.rotate_deg > 0.0 {
            let deg = rng.random_range(-self.rotate_deg..=self.rotate_deg);
            // The corners take the nearest edge pixel rather than black.
            img = rotate_about_center(
                &img,
                deg.to_radians(),
                Interpolation::Bilinear,
                Border::Replicate,
            );
        }
        let mut out = img.into_raw();
        if self.brightness > 0.0 || self.contrast > 0.0 {
            let shift = rng.random_range(-self.brightness..=self.brightness) * 255.0;
            let scale = 1.0 + rng.random_range(-self.contrast..=self.contrast);
            let mean = out.iter().map(|&v| v as f32).sum::<f32>() / out.len() as f32;
            for v in &mut out {
                *v = ((*v as f32 - mean) * scale + mean + shift).clamp(0.0, 255.0) as u8;
            }
        }
        if rng.random::<f32>() < self.erase {
            let area = (side * side) as f32 * rng.random_range(0.02..0.33);
            let aspect = rng.random_range(0.3f32..3.3);
            let h = ((area * aspect).sqrt() as u32).clamp(1, side);
            let w = ((area / aspect).sqrt() as u32).clamp(1, side);
            let (y0, x0) = (
                rng.random_range(0..=side - h),
                rng.random_range(0..=side - w),
            );
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    out[(y * side + x) as usize] = rng.random();
                }
            }
        }
        out
    }
}

/// The test-time views of `side × side` crops (flat, one after another): `n·V` crops with each
/// crop's views together, in the order `Tta` documents (for ten-crop, which needs 48x48 crops,
/// each 44-px crop's mirror image first): what inference averages over.
pub fn test_views(tta: crate::config::Tta, crops: &[u8], side: usize) -> Vec<u8> {
    use crate::config::Tta;
    match tta {
        Tta::None => crops.to_vec(),
        Tta::Flip => crops
            .chunks_exact(side * side)
            .flat_map(|c| {
                let mirror = c.chunks_exact(side).flat_map(|row| row.iter().rev());
                c.iter().chain(mirror).copied()
            })
            .collect(),
        Tta::TenCrop => crops
            .chunks_exact(side * side)
            .flat_map(|c| ten_crops(c, 44).into_iter().flatten())
            .collect(),
    }
}

/// Ten-crop test-time views of a 48x48 image: the four corner and the centre crops of side
/// `crop` (resized back to 48), and their horizontal mirrors.
pub fn ten_crops(pixels: &[u8], crop: u32) -> Vec<Vec<u8>> {
    let side = FACE_SIZE as u32;
    let crop = crop.clamp(8, side);
    let img = GrayImage::from_raw(side, side, pixels.to_vec())
        .unwrap_or_else(|| GrayImage::new(side, side));
    let far = side - crop;
    let mut views = Vec::with_capacity(10);
    for (x, y) in [(0, 0), (far, 0), (0, far), (far, far), (far / 2, far / 2)] {
        let c = image::imageops::crop_imm(&img, x, y, crop, crop).to_image();
        let r = image::imageops::resize(&c, side, side, FilterType::Triangle);
        views.push(image::imageops::flip_horizontal(&r).into_raw());
        views.push(r.into_raw());
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient() -> Vec<u8> {
        (0..FACE_SIZE * FACE_SIZE)
            .map(|i| ((i % FACE_SIZE) * 5) as u8)
            .collect()
    }

    #[test]
    fn none_is_identity_and_shapes_hold() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let img = gradient();
        assert_eq!(Augment::none().apply(&img, &mut rng), img);
        for a in [Augment::supervised(), Augment::ssl()] {
            a.validate().unwrap();
            for _ in 0..20 {
                assert_eq!(a.apply(&img, &mut rng).len(), FACE_SIZE * FACE_SIZE);
            }
        }
    }

    /// Each crop's views come together, in the order inference averages them in.
    #[test]
    fn test_views_lay_out_each_crops_views_together() {
        use crate::config::Tta;
        let a = gradient();
        let b: Vec<u8> = a.iter().map(|&p| 255 - p).collect();
        let two = [a.clone(), b.clone()].concat();
        assert_eq!(test_views(Tta::None, &two, FACE_SIZE), two);
        let flip = test_views(Tta::Flip, &two, FACE_SIZE);
        let n = FACE_SIZE * FACE_SIZE;
        assert_eq!(flip.len(), 4 * n);
        assert_eq!(flip[..n], a[..]);
        assert_eq!(flip[2 * n..3 * n], b[..]);
        // The mirror: the first row of the second view is the first row reversed.
        let row: Vec<u8> = a[..FACE_SIZE].iter().rev().copied().collect();
        assert_eq!(flip[n..n + FACE_SIZE], row[..]);
        let ten = test_views(Tta::TenCrop, &two, FACE_SIZE);
        assert_eq!(
            ten,
            [ten_crops(&a, 44).concat(), ten_crops(&b, 44).concat()].concat()
        );
        // A 2x2 crop flips too (inference's other input sizes).
        assert_eq!(
            test_views(Tta::Flip, &[1, 2, 3, 4], 2),
            [1, 2, 3, 4, 2, 1, 4, 3]
        );
    }

    #[test]
    fn ten_crops_are_ten_mirrored_views() {
        let img = gradient();
        let v = ten_crops(&img, 44);
        assert_eq!(v.len(), 10);
        assert!(v.iter().all(|x| x.len() == FACE_SIZE * FACE_SIZE));
        for pair in v.chunks(2) {
            for y in 0..FACE_SIZE {
                for x in 0..FACE_SIZE {
                    assert_eq!(
                        pair[0][y * FACE_SIZE + x],
                        pair[1][y * FACE_SIZE + FACE_SIZE - 1 - x]
                    );
                }
            }
        }
        // The left corner crop starts darker than the right one (the gradient rises to the right).
        assert!(v[1][0] < v[3][0]);
    }

    #[test]
    fn flip_really_flips() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let a = Augment {
            flip: 1.0,
            ..Augment::none()
        };
        let img = gradient();
        let out = a.apply(&img, &mut rng);
        for y in 0..FACE_SIZE {
            for x in 0..FACE_SIZE {
                assert_eq!(
                    out[y * FACE_SIZE + x],
                    img[y * FACE_SIZE + FACE_SIZE - 1 - x]
                );
            }
        }
    }

    #[test]
    fn photometric_jitter_keeps_range_and_changes_pixels() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let a = Augment {
            brightness: 0.5,
            contrast: 0.5,
            ..Augment::none()
        };
        let img = gradient();
        let changed = (0..10).any(|_| a.apply(&img, &mut rng) != img);
        assert!(changed);
        let e = Augment {
            erase: 1.0,
            ..Augment::none()
        };
        let flat = vec![100u8; FACE_SIZE * FACE_SIZE];
        let out = e.apply(&flat, &mut rng);
        let erased = out.iter().filter(|&&v| v != 100).count();
        assert!(
            erased > 10 && erased < FACE_SIZE * FACE_SIZE / 2,
            "{erased}"
        );
    }

    #[test]
    fn small_rotation_keeps_centre() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let a = Augment {
            rotate_deg: 5.0,
            ..Augment::none()
        };
        let flat = vec![77u8; FACE_SIZE * FACE_SIZE];
        // A uniform image rotated with edge replication stays uniform.
        assert!(a
            .apply(&flat, &mut rng)
            .iter()
            .all(|&v| v.abs_diff(77) <= 1));
        assert!(Augment {
            crop_min: 0.0,
            ..Augment::none()
        }
        .validate()
        .is_err());
    }

    fn webcam() -> Webcam {
        Webcam {
            framing_scale_sd: 0.15,
            framing_shift_sd: 0.055,
            downscale_p: 0.5,
            downscale_min: 0.5,
            blur_max: 1.0,
            noise_max: 4.0,
            gamma_lo: 0.8,
            gamma_hi: 1.25,
        }
    }

    #[test]
    fn webcam_conditions_draw_nothing_when_off_and_change_faces_when_on() {
        use rand::rngs::StdRng;
        // Off (the default of every stage): the image and the random stream are untouched, so
        // a config written before these existed trains exactly as before.
        let (mut a, mut b) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
        let img = GrayImage::from_raw(48, 48, gradient()).unwrap();
        assert_eq!(Webcam::default().apply(img.clone(), &mut a), img);
        assert_eq!(a.random::<u64>(), b.random::<u64>());
        // A config without the field reads as off; unknown fields inside it are refused.
        let old: Augment = serde_json::from_str(r#"{"flip": 0.5}"#).unwrap();
        assert_eq!(old.webcam, Webcam::default());
        assert!(serde_json::from_str::<Augment>(r#"{"webcam": {"blurr": 1}}"#).is_err());
        // On: the face changes, the shape holds, a flat image stays flat but for the noise.
        let on = Augment {
            webcam: webcam(),
            ..Augment::none()
        };
        on.validate().unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let face = gradient();
        for _ in 0..10 {
            let out = on.apply(&face, &mut rng);
            assert_eq!(out.len(), face.len());
            assert_ne!(out, face);
        }
        let flat = vec![128u8; FACE_SIZE * FACE_SIZE];
        let quiet = Augment {
            webcam: Webcam {
                noise_max: 0.0,
                gamma_lo: 0.0,
                gamma_hi: 0.0,
                ..webcam()
            },
            ..Augment::none()
        };
        // (imageproc's Gaussian blur truncates in each of its two passes: up to 2 levels.)
        for _ in 0..10 {
            assert!(quiet
                .apply(&flat, &mut rng)
                .iter()
                .all(|&v| v.abs_diff(128) <= 2));
        }
        // Framing alone moves the content: a crop shifted right of centre by a tenth of the side
        // starts, on a left-to-right ramp, at a brighter column.
        let framing = Webcam {
            framing_shift_sd: 0.1,
            ..Webcam::default()
        };
        let mut moved = 0;
        for _ in 0..20 {
            let out = framing.apply(img.clone(), &mut rng);
            moved += usize::from(out.get_pixel(24, 24) != img.get_pixel(24, 24));
        }
        assert!(moved > 10, "{moved}");
    }

    #[test]
    fn webcam_ranges_are_checked() {
        for bad in [
            Webcam {
                framing_scale_sd: -0.1,
                ..Webcam::default()
            },
            Webcam {
                framing_shift_sd: f32::NAN,
                ..Webcam::default()
            },
            Webcam {
                downscale_p: 0.5,
                downscale_min: 0.0,
                ..Webcam::default()
            },
            Webcam {
                blur_max: 50.0,
                ..Webcam::default()
            },
            Webcam {
                noise_max: -1.0,
                ..Webcam::default()
            },
            Webcam {
                gamma_lo: 1.2,
                gamma_hi: 0.8,
                ..Webcam::default()
            },
            Webcam {
                gamma_lo: 0.0,
                gamma_hi: 1.2,
                ..Webcam::default()
            },
        ] {
            let a = Augment {
                webcam: bad.clone(),
                ..Augment::none()
            };
            assert!(a.validate().is_err(), "{bad:?}");
        }
    }
}
