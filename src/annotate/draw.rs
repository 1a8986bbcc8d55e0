//! Drawing on a 4:2:0 frame: filled and outlined boxes, 8x8 bitmap text (font8x8, public-domain
//! glyphs), and the overlay of one classified face (box, label, probability bar) plus a legend.

use font8x8::legacy::BASIC_LEGACY;

use crate::capture::color::{plane_size, rgb_to_yuv, yuv_to_rgb, Chroma};
use crate::emit::FaceOut;

/// A colour as BT.601 full-range Y, U, V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Yuv(pub u8, pub u8, pub u8);

impl Yuv {
    pub fn rgb(r: u8, g: u8, b: u8) -> Self {
        let [y, u, v] = rgb_to_yuv(r, g, b);
        Yuv(y, u, v)
    }
}

pub const WHITE: Yuv = Yuv(255, 128, 128);
pub const BLACK: Yuv = Yuv(16, 128, 128);

/// The colour of a class ([`crate::palette`]).
pub fn class_color(name: &str, index: usize) -> Yuv {
    let (r, g, b) = crate::palette::class_rgb(name, index);
    Yuv::rgb(r, g, b)
}

/// A frame being drawn on: luma plus 4:2:0 chroma.
#[derive(Debug, Clone)]
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub y: Vec<u8>,
    pub chroma: Chroma,
}

impl Canvas {
    /// A frame's planes; gray chroma when the frame has none.
    pub fn new(width: usize, height: usize, y: Vec<u8>, chroma: Option<Chroma>) -> Self {
        let (cw, ch) = plane_size(width, height);
        let chroma = chroma
            .filter(|c| c.u.len() == cw * ch && c.v.len() == cw * ch)
            .unwrap_or_else(|| Chroma::neutral(width, height));
        Self {
            width,
            height,
            y,
            chroma,
        }
    }

    /// This frame scaled (nearest neighbour, aspect kept) and centred on a black `w`×`h` canvas;
    /// itself when the size already matches.
    pub fn fit(self, w: usize, h: usize) -> Canvas {
        if (w, h) == (self.width, self.height) {
            return self;
        }
        let mut out = Canvas::new(w, h, vec![BLACK.0; w * h], None);
        let scale = (w as f64 / self.width as f64).min(h as f64 / self.height as f64);
        let (sw, sh) = (
            ((self.width as f64 * scale) as usize).clamp(1, w),
            ((self.height as f64 * scale) as usize).clamp(1, h),
        );
        let (ox, oy) = ((w - sw) / 2, (h - sh) / 2);
        for y in 0..sh {
            let src_row = (y * self.height / sh).min(self.height - 1) * self.width;
            for x in 0..sw {
                out.y[(oy + y) * w + ox + x] =
                    self.y[src_row + (x * self.width / sw).min(self.width - 1)];
            }
        }
        let (cw, ch) = plane_size(w, h);
        let (scw, sch) = plane_size(self.width, self.height);
        // Each output chroma sample takes the source chroma under its top-left luma pixel.
        let src_of = |l: usize, o: usize, span: usize, src: usize| -> Option<usize> {
            (l >= o && l < o + span).then(|| (l - o) * src / span)
        };
        for cy in 0..ch {
            let Some(sy) = src_of(2 * cy, oy, sh, self.height) else {
                continue;
            };
            for cx in 0..cw {
                let Some(sx) = src_of(2 * cx, ox, sw, self.width) else {
                    continue;
                };
                let (i, j) = (
                    cy * cw + cx,
                    (sy / 2).min(sch - 1) * scw + (sx / 2).min(scw - 1),
                );
                out.chroma.u[i] = self.chroma.u[j];
                out.chroma.v[i] = self.chroma.v[j];
            }
        }
        out
    }

    /// Text scale (glyph pixels per font pixel) that keeps labels readable at this size.
    pub fn text_scale(&self) -> usize {
        (self.height.min(self.width) / 300).max(1)
    }

    /// Fills the rectangle `[x0, x1) × [y0, y1)`, clipped to the frame.
    pub fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Yuv) {
        let (w, h) = (self.width as i64, self.height as i64);
        let (x0, x1) = (x0.clamp(0, w) as usize, x1.clamp(0, w) as usize);
        let (y0, y1) = (y0.clamp(0, h) as usize, y1.clamp(0, h) as usize);
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        for row in y0..y1 {
            self.y[row * self.width + x0..row * self.width + x1].fill(c.0);
        }
        let cw = self.width.div_ceil(2);
        for row in y0 / 2..y1.div_ceil(2) {
            let span = row * cw + x0 / 2..row * cw + x1.div_ceil(2);
            self.chroma.u[span.clone()].fill(c.1);
            self.chroma.v[span].fill(c.2);
        }
    }

    /// A rectangle's outline of `t` pixels inside `[x0, x1) × [y0, y1)`; `dashed` draws it in
    /// segments (the uncertain-face style).
    #[allow(clippy::too_many_arguments)]
    pub fn outline(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, t: i64, c: Yuv, dashed: bool) {
        let dash = 4 * t.max(2);
        let hline = |cv: &mut Self, y: i64| {
            let mut x = x0;
            while x < x1 {
                let end = if dashed { (x + dash).min(x1) } else { x1 };
                cv.fill(x, y, end, y + t, c);
                x = end + if dashed { dash } else { 0 };
            }
        };
        hline(self, y0);
        hline(self, y1 - t);
        let mut y = y0;
        while y < y1 {
            let end = if dashed { (y + dash).min(y1) } else { y1 };
            self.fill(x0, y, x0 + t, end, c);
            self.fill(x1 - t, y, x1, end, c);
            y = end + if dashed { dash } else { 0 };
        }
    }

    /// Writes `text` (ASCII; anything else as `?`) with its top-left at (x, y), `scale` pixels per
    /// font pixel, on a `bg` box. Returns the drawn width.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, fg: Yuv, bg: Yuv) -> i64 {
        let s = scale as i64;
        let width = 8 * s * text.chars().count() as i64;
        self.fill(x - s, y - s, x + width + s, y + 8 * s + s, bg);
        for (i, ch) in text.chars().enumerate() {
            let glyph = BASIC_LEGACY[if ch.is_ascii() {
                ch as usize
            } else {
                b'?' as usize
            }];
            let gx = x + 8 * s * i as i64;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        let (px, py) = (gx + col * s, y + row as i64 * s);
                        self.fill(px, py, px + s, py + s, fg);
                    }
                }
            }
        }
        width
    }

    /// The faces of a frame: each box and bar first, then the captions, placed so that no two
    /// overlap (a group photo's neighbours push each other's captions down).
    pub fn faces(&mut self, faces: &[FaceOut]) {
        for f in faces {
            self.face(f);
        }
        let s = self.text_scale() as i64;
        for (f, r) in faces.iter().zip(self.caption_boxes(faces)) {
            self.text(r[0] + s, r[1] + s, &caption(f), s as usize, WHITE, BLACK);
        }
    }

    /// Where each face's caption goes, as `[x0, y0, x1, y1]` of its background: above the box
    /// when there is room, else just inside its top edge; then down, one caption at a time,
    /// until it is clear of the captions already placed (or the frame's bottom is reached).
    fn caption_boxes(&self, faces: &[FaceOut]) -> Vec<[i64; 4]> {
        let s = self.text_scale() as i64;
        let t = self.line_width();
        let max_y = (self.height as i64 - 10 * s).max(0);
        let mut placed: Vec<[i64; 4]> = Vec::new();
        for f in faces {
            let [x, y, _, _] = f.bbox.map(|v| v as i64);
            let w = 8 * s * caption(f).chars().count() as i64 + 2 * s;
            let mut top = if y - 10 * s >= 0 { y - 10 * s } else { y + t };
            for _ in 0..=faces.len() {
                let r = [x, top, x + w, top + 10 * s];
                match placed.iter().find(|p| overlaps(p, &r)) {
                    Some(p) if p[3] <= max_y => top = p[3],
                    _ => break,
                }
            }
            placed.push([x, top, x + w, top + 10 * s]);
        }
        placed
    }

    /// Box outlines' thickness for this frame size.
    fn line_width(&self) -> i64 {
        (self.height.min(self.width) as i64 / 180).max(1) + 1
    }

    /// One face without its caption: its box (solid when certain, dashed when not) in the
    /// label's class colour and a bar of its class probabilities.
    pub fn face(&mut self, f: &FaceOut) {
        let s = self.text_scale() as i64;
        let names = &f.probs.names;
        let top = names.iter().position(|n| *n == f.label).unwrap_or(0);
        let color = class_color(&f.label, top);
        let [x, y, w, h] = f.bbox.map(|v| v as i64);
        let t = self.line_width();
        self.outline(x, y, x + w, y + h, t, color, !f.certain);
        // The probability bar under the box: one segment per class, in class colours.
        let bar_h = 5 * s;
        let by = if y + h + bar_h + 2 * s <= self.height as i64 {
            y + h + s
        } else {
            y + h - bar_h - t
        };
        let bar_w = w.max(56 * s);
        self.fill(x - 1, by - 1, x + bar_w + 1, by + bar_h + 1, BLACK);
        let mut left = 0.0f64;
        for (i, (name, v)) in names.iter().zip(&f.probs.values).enumerate() {
            let x0 = x + (left * bar_w as f64).round() as i64;
            left += (*v as f64).clamp(0.0, 1.0);
            let x1 = x + (left.min(1.0) * bar_w as f64).round() as i64;
            self.fill(x0, by, x1, by + bar_h, class_color(name, i));
        }
    }

    /// The frame as 8-bit RGB, row-major (chroma upsampled by repetition).
    pub fn to_rgb(&self) -> Vec<u8> {
        let cw = plane_size(self.width, self.height).0;
        let mut out = Vec::with_capacity(self.width * self.height * 3);
        for row in 0..self.height {
            for col in 0..self.width {
                let c = (row / 2) * cw + col / 2;
                out.extend(yuv_to_rgb(
                    self.y[row * self.width + col],
                    self.chroma.u[c],
                    self.chroma.v[c],
                ));
            }
        }
        out
    }

    /// The class-colour key along the bottom edge, wrapping to more rows on narrow frames.
    pub fn legend(&mut self, names: &[String]) {
        let s = self.text_scale() as i64;
        let entry = |n: &String| 8 * s * (n.chars().take(3).count() as i64 + 2);
        let rows = {
            let (mut rows, mut x) = (1, 0);
            for n in names {
                if x > 0 && x + entry(n) > self.width as i64 {
                    rows += 1;
                    x = 0;
                }
                x += entry(n);
            }
            rows
        };
        let (mut x, mut y) = (s, self.height as i64 - rows * 10 * s);
        for (i, n) in names.iter().enumerate() {
            if x > s && x + entry(n) > self.width as i64 {
                x = s;
                y += 10 * s;
            }
            self.fill(x, y + s, x + 6 * s, y + 7 * s, class_color(n, i));
            let short: String = n.chars().take(3).collect();
            self.text(x + 8 * s, y, &short, s as usize, WHITE, BLACK);
            x += entry(n);
        }
    }
}

/// `#id label pp%`, with `?` after an uncertain label.
fn caption(f: &FaceOut) -> String {
    let top = f
        .probs
        .names
        .iter()
        .position(|n| *n == f.label)
        .unwrap_or(0);
    let p = f.probs.values.get(top).copied().unwrap_or(0.0);
    format!(
        "#{} {}{} {:.0}%",
        f.id,
        f.label,
        if f.certain { "" } else { "?" },
        100.0 * p
    )
}

/// Whether two `[x0, y0, x1, y1]` rectangles share any pixel.
fn overlaps(a: &[i64; 4], b: &[i64; 4]) -> bool {
    a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::ClassMap;
    use std::sync::Arc;

    fn canvas(w: usize, h: usize) -> Canvas {
        Canvas::new(w, h, vec![100; w * h], None)
    }

    #[test]
    fn fill_is_clipped_and_sets_chroma() {
        let mut c = canvas(5, 3);
        c.fill(-2, -2, 2, 1, Yuv(1, 2, 3));
        assert_eq!(&c.y[..5], &[1, 1, 100, 100, 100]);
        assert_eq!(c.y[5], 100);
        assert_eq!((c.chroma.u[0], c.chroma.v[0], c.chroma.u[1]), (2, 3, 128));
        c.fill(3, 1, 99, 99, WHITE);
        assert_eq!(c.y[14], 255);
        c.fill(4, 0, 2, 3, BLACK); // empty
        assert_eq!(c.y[4], 100);
    }

    #[test]
    fn fit_keeps_the_aspect_and_centres() {
        let c = Canvas::new(2, 2, vec![200; 4], None);
        let f = c.fit(6, 2);
        assert_eq!((f.width, f.height), (6, 2));
        assert_eq!(
            f.y,
            vec![16, 16, 200, 200, 16, 16, 16, 16, 200, 200, 16, 16]
        );
        assert_eq!(f.chroma.u.len(), 3);
    }

    #[test]
    fn text_draws_glyphs_inside_its_box() {
        let mut c = canvas(40, 12);
        let w = c.text(2, 2, "Hi", 1, WHITE, BLACK);
        assert_eq!(w, 16);
        let lit = c.y.iter().filter(|&&v| v == 255).count();
        let dark = c.y.iter().filter(|&&v| v == 16).count();
        assert!(lit > 10 && dark > 50, "{lit} {dark}");
        // Nothing right of the box (x ≥ 2 + 16 + 1).
        assert!((0..12).all(|r| c.y[r * 40 + 19..r * 40 + 40].iter().all(|&v| v == 100)));
    }

    #[test]
    fn uncertain_faces_get_a_dashed_box() {
        let names = Arc::new(vec!["happy".to_string(), "sad".to_string()]);
        let mut face = FaceOut {
            id: 3,
            bbox: [20, 20, 40, 40],
            det_score: 5.0,
            roll_deg: None,
            label: "happy".into(),
            probs: ClassMap {
                names: names.clone(),
                values: vec![0.7, 0.3],
            },
            votes: ClassMap {
                names,
                values: vec![1.0, 0.0],
            },
            certain: true,
            p_value: Some(0.001),
            entropy: 0.6,
        };
        let left_edge = |c: &Canvas| (20..60).filter(|r| c.y[r * 100 + 20] != 100).count();
        let mut solid = canvas(100, 100);
        solid.face(&face);
        face.certain = false;
        let mut dashed = canvas(100, 100);
        dashed.face(&face);
        assert_eq!(left_edge(&solid), 40);
        assert!(
            (10..35).contains(&left_edge(&dashed)),
            "{}",
            left_edge(&dashed)
        );
        // The box is in happy's colour.
        assert_eq!(solid.y[40 * 100 + 20], class_color("happy", 0).0);
        // Pixels far from the face stay untouched.
        assert_eq!(
            (solid.y[95 * 100 + 95], solid.chroma.u[49 * 50 + 49]),
            (100, 128)
        );
    }

    #[test]
    fn captions_of_neighbouring_faces_do_not_overlap() {
        let names = Arc::new(vec!["happy".to_string(), "surprise".to_string()]);
        let face = |id: u64, x: i32, y: i32| FaceOut {
            id,
            bbox: [x, y, 30, 30],
            det_score: 5.0,
            roll_deg: None,
            label: "surprise".into(),
            probs: ClassMap {
                names: names.clone(),
                values: vec![0.1, 0.9],
            },
            votes: ClassMap {
                names: names.clone(),
                values: vec![0.0, 1.0],
            },
            certain: false,
            p_value: None,
            entropy: 0.3,
        };
        // A row of close faces (a group photo): each caption is wider than the gap.
        let faces: Vec<FaceOut> = (0..5)
            .map(|i| face(i + 1, 40 + 35 * i as i32, 60))
            .collect();
        let mut c = canvas(320, 240);
        let boxes = c.caption_boxes(&faces);
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                assert!(!overlaps(a, b), "{a:?} {b:?}");
            }
        }
        // The first keeps its place above its box; the drawing uses these places.
        assert_eq!(boxes[0][3], 60);
        c.faces(&faces);
        assert_eq!(
            c.y[(boxes[4][1] as usize + 1) * 320 + boxes[4][0] as usize + 1],
            16
        );
    }
}
