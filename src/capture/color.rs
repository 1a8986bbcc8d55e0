//! A frame's colour, kept only when something downstream draws on the frame (`--annotate`):
//! the U and V planes at 4:2:0, whatever layout the source delivered.

/// U and V planes at 4:2:0: each `ceil(w/2)` × `ceil(h/2)` bytes, row-major, 128 = no colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Chroma {
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

/// BT.601 full-range (`C420jpeg`) Y, U, V of an RGB colour.
pub fn rgb_to_yuv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let (r, g, b) = (r as f32, g as f32, b as f32);
    let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    [
        q(0.299 * r + 0.587 * g + 0.114 * b),
        q(128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b),
        q(128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b),
    ]
}

/// BT.601 full-range luma of an RGB colour: the grey level fer-cam gives colour pixels from every
/// source (stills, image folders, RGB and MJPEG camera frames), the same Y a `C420jpeg` video
/// carries for that colour.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    (0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32)
        .round()
        .clamp(0.0, 255.0) as u8
}

/// The grey plane of a decoded image: grey images as they are (16-bit ones scaled to 8), colour
/// ones through [`luma`] (the image crate's own conversion weighs green by BT.709 instead).
pub fn gray_image(img: image::DynamicImage) -> image::GrayImage {
    use image::DynamicImage::*;
    match img {
        ImageLuma8(_) | ImageLumaA8(_) | ImageLuma16(_) | ImageLumaA16(_) => img.into_luma8(),
        _ => {
            let rgb = img.into_rgb8();
            let (w, h) = rgb.dimensions();
            let plane = rgb.pixels().map(|p| luma(p[0], p[1], p[2])).collect();
            image::GrayImage::from_raw(w, h, plane).expect("one grey level per pixel")
        }
    }
}

/// RGB of a BT.601 full-range Y, U, V (the inverse of [`rgb_to_yuv`]).
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let (y, u, v) = (y as f32, u as f32 - 128.0, v as f32 - 128.0);
    let q = |x: f32| x.round().clamp(0.0, 255.0) as u8;
    [
        q(y + 1.402 * v),
        q(y - 0.344_136 * u - 0.714_136 * v),
        q(y + 1.772 * u),
    ]
}

/// Size of one 4:2:0 chroma plane of a `w`×`h` frame.
pub fn plane_size(w: usize, h: usize) -> (usize, usize) {
    (w.div_ceil(2), h.div_ceil(2))
}

/// Averages a `pw`×`ph` plane over blocks of `sx`×`sy` samples (clipped at the edges) into a plane
/// of `cw`×`ch`. `sx = sy = 1` copies.
fn subsample(plane: &[u8], pw: usize, ph: usize, sx: usize, sy: usize) -> Vec<u8> {
    let (cw, ch) = (pw.div_ceil(sx), ph.div_ceil(sy));
    let mut out = Vec::with_capacity(cw * ch);
    for cy in 0..ch {
        let rows = cy * sy..((cy + 1) * sy).min(ph);
        for cx in 0..cw {
            let cols = cx * sx..((cx + 1) * sx).min(pw);
            let (mut sum, mut n) = (0u32, 0u32);
            for y in rows.clone() {
                for x in cols.clone() {
                    sum += plane[y * pw + x] as u32;
                    n += 1;
                }
            }
            out.push(((sum + n / 2) / n) as u8);
        }
    }
    out
}

impl Chroma {
    /// From planar U and V of a `w`×`h` frame whose chroma planes are `pw`×`ph` (4:2:0, 4:2:2 or
    /// 4:4:4 as stored in YUV4MPEG2). `None` when `planes` is too short or the layout is not one
    /// of those.
    pub fn from_planes(planes: &[u8], w: usize, h: usize, pw: usize, ph: usize) -> Option<Self> {
        let n = pw * ph;
        if planes.len() < 2 * n || pw == 0 || ph == 0 {
            return None;
        }
        let (cw, ch) = plane_size(w, h);
        // Each plane is either already half the frame's side (copy) or full (average pairs).
        let factor = |p: usize, half: usize, full: usize| match p {
            _ if p == half => Some(1),
            _ if p == full => Some(2),
            _ => None,
        };
        let (fx, fy) = (factor(pw, cw, w)?, factor(ph, ch, h)?);
        Some(Self {
            u: subsample(&planes[..n], pw, ph, fx, fy),
            v: subsample(&planes[n..2 * n], pw, ph, fx, fy),
        })
    }

    /// From packed RGB (`w`×`h`×3), BT.601 full range (the `C420jpeg` convention).
    pub fn from_rgb(rgb: &[u8], w: usize, h: usize) -> Option<Self> {
        if rgb.len() < 3 * w * h {
            return None;
        }
        let plane = |pick: fn([u8; 3]) -> u8| -> Vec<u8> {
            let full: Vec<u8> = rgb
                .chunks_exact(3)
                .take(w * h)
                .map(|p| pick(rgb_to_yuv(p[0], p[1], p[2])))
                .collect();
            subsample(&full, w, h, 2, 2)
        };
        Some(Self {
            u: plane(|c| c[1]),
            v: plane(|c| c[2]),
        })
    }

    /// From packed YUYV (4:2:2, `w`×`h`, 2 bytes a pixel).
    pub fn from_yuyv(raw: &[u8], w: usize, h: usize) -> Option<Self> {
        if raw.len() < 2 * w * h || w < 2 {
            return None;
        }
        let pw = w / 2;
        let (mut u, mut v) = (Vec::with_capacity(pw * h), Vec::with_capacity(pw * h));
        for row in raw[..2 * w * h].chunks_exact(2 * w) {
            for quad in row.chunks_exact(4) {
                u.push(quad[1]);
                v.push(quad[3]);
            }
        }
        let n = pw * h;
        u.extend(v);
        Self::from_planes(&u[..2 * n], w, h, pw, h)
    }

    /// From NV12 (a `w`×`h` luma plane, then interleaved UV at 4:2:0).
    pub fn from_nv12(raw: &[u8], w: usize, h: usize) -> Option<Self> {
        let (cw, ch) = plane_size(w, h);
        let uv = raw.get(w * h..w * h + 2 * cw * ch)?;
        Some(Self {
            u: uv.iter().step_by(2).copied().collect(),
            v: uv.iter().skip(1).step_by(2).copied().collect(),
        })
    }

    /// A colourless frame's chroma.
    pub fn neutral(w: usize, h: usize) -> Self {
        let (cw, ch) = plane_size(w, h);
        Self {
            u: vec![128; cw * ch],
            v: vec![128; cw * ch],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One grey for a colour from every source: BT.601's weights (red 76, green 150, blue 29),
    /// the Y of [`rgb_to_yuv`]; grey images pass unchanged.
    #[test]
    fn colour_images_turn_grey_by_bt601() {
        assert_eq!(
            [luma(255, 0, 0), luma(0, 255, 0), luma(0, 0, 255)],
            [76, 150, 29]
        );
        for (r, g, b) in [(0, 0, 0), (255, 255, 255), (12, 200, 77), (250, 3, 130)] {
            assert_eq!(luma(r, g, b), rgb_to_yuv(r, g, b)[0]);
        }
        let rgb =
            image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 90, y as u8 * 200, 40]));
        let grey = gray_image(image::DynamicImage::ImageRgb8(rgb.clone()));
        for (p, q) in rgb.pixels().zip(grey.pixels()) {
            assert_eq!(q[0], luma(p[0], p[1], p[2]));
        }
        let g = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 40 + y) as u8]));
        assert_eq!(gray_image(image::DynamicImage::ImageLuma8(g.clone())), g);
    }

    #[test]
    fn planar_layouts_reduce_to_420() {
        // 3x2 frame. 4:2:0 planes are 2x1: copied.
        let c = Chroma::from_planes(&[1, 2, 3, 4], 3, 2, 2, 1).unwrap();
        assert_eq!((c.u, c.v), (vec![1, 2], vec![3, 4]));
        // 4:2:2 planes are 2x2: rows averaged.
        let c = Chroma::from_planes(&[10, 20, 30, 40, 1, 1, 3, 3], 3, 2, 2, 2).unwrap();
        assert_eq!((c.u, c.v), (vec![20, 30], vec![2, 2]));
        // 4:4:4 planes are 3x2: 2x2 blocks averaged, the odd column alone.
        let u = [0, 4, 100, 8, 12, 50];
        let c = Chroma::from_planes(&[&u[..], &u[..]].concat(), 3, 2, 3, 2).unwrap();
        assert_eq!(c.u, vec![6, 75]);
        assert!(Chroma::from_planes(&[1, 2, 3], 3, 2, 2, 1).is_none());
        assert!(Chroma::from_planes(&[0; 64], 8, 8, 1, 1).is_none());
    }

    #[test]
    fn rgb_gray_has_no_colour_and_red_has_high_v() {
        let gray = Chroma::from_rgb(&[90; 12], 2, 2).unwrap();
        assert_eq!((gray.u, gray.v), (vec![128], vec![128]));
        let red = Chroma::from_rgb(&[255, 0, 0].repeat(4), 2, 2).unwrap();
        assert!(red.v[0] > 230 && red.u[0] < 100, "{red:?}");
    }

    #[test]
    fn packed_camera_layouts() {
        // YUYV 2x2: per row one (u, v) pair; rows averaged.
        let c = Chroma::from_yuyv(&[0, 10, 0, 20, 0, 30, 0, 40], 2, 2).unwrap();
        assert_eq!((c.u, c.v), (vec![20], vec![30]));
        let c = Chroma::from_nv12(&[0, 0, 0, 0, 7, 9], 2, 2).unwrap();
        assert_eq!((c.u, c.v), (vec![7], vec![9]));
        assert!(Chroma::from_nv12(&[0; 5], 2, 2).is_none());
    }

    #[test]
    fn yuv_and_rgb_round_trip() {
        for rgb in [
            [0u8, 0, 0],
            [255, 255, 255],
            [213, 94, 0],
            [0, 114, 178],
            [30, 200, 90],
        ] {
            let [y, u, v] = rgb_to_yuv(rgb[0], rgb[1], rgb[2]);
            let back = yuv_to_rgb(y, u, v);
            for (a, b) in rgb.iter().zip(back) {
                assert!((*a as i32 - b as i32).abs() <= 2, "{rgb:?} -> {back:?}");
            }
        }
    }
}
