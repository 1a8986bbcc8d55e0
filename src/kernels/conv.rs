//! The per-layer choice of convolution path, in one place: Winograd (AVX-512) for 3x3 stride-1
//! layers with enough tiles, the direct kernel (AVX-512 or AVX2) for the rest, the im2col + GEMM
//! reference where the CPU has neither; and the cache of packed weights the fast paths use in inference.

use std::sync::OnceLock;

use super::geom::ConvGeom;
use super::reference::{
    conv2d_backward_input_gemm, conv2d_backward_weight_gemm, conv2d_forward_gemm,
};
use super::{direct, wgrad, winograd, WeightFormat};

/// Weights packed for the AVX-512 kernels, each layout built on first use and kept (for
/// inference, where the weights do not change between calls).
#[derive(Debug, Default)]
pub struct PackedCache {
    format: WeightFormat,
    direct: OnceLock<direct::PackedWeights>,
    /// [`WeightFormat::F16`]: the few-positions kernel's half-precision panels (`None`
    /// where the weights do not fit half's range).
    direct_half: OnceLock<Option<direct::PackedWeights>>,
    /// F(2x2,3x3) and F(4x4,3x3) weights (which one runs depends on the input size).
    winograd: [OnceLock<winograd::PackedWinograd>; 2],
}

impl PackedCache {
    /// An empty cache whose packs use `format`.
    pub fn new(format: WeightFormat) -> Self {
        Self {
            format,
            ..Self::default()
        }
    }
}

/// Forward convolution `x (b,c,h,w) * w (k,c,kh,kw) [+ bias] [ReLU]` → `(b,k,oh,ow)`.
///
/// Picks the kernel: Winograd (F(4x4,3x3) or F(2x2,3x3), [`winograd::tile_size`]) for 3x3
/// stride-1 layers large enough to gain (AVX-512 only), the direct kernel for the rest (AVX-512
/// or AVX2), and im2col + GEMM where the CPU has neither. Weights are packed for this call
/// unless `cache` holds them.
pub fn conv2d_forward(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    cache: Option<&PackedCache>,
) -> Vec<f32> {
    assert_eq!(wt.len(), g.weight_len());
    if let Some(m) = winograd::tile_size(g) {
        let pack = || winograd::PackedWinograd::pack(wt, g.k, g.c, m);
        match cache {
            Some(c) => {
                let slot = &c.winograd[usize::from(m == 4)];
                winograd::conv_forward(g, x, slot.get_or_init(pack), bias, relu)
            }
            None => winograd::conv_forward(g, x, &pack(), bias, relu),
        }
    } else if direct::runs(g) {
        let pack = || direct::PackedWeights::pack(wt, g.k, g.c, g.kh, g.kw);
        match cache {
            Some(c) => {
                let half = (c.format == WeightFormat::F16 && direct::half_weights_pay(g))
                    .then(|| {
                        let pack = || direct::PackedWeights::pack_half(wt, g.k, g.c, g.kh, g.kw);
                        c.direct_half.get_or_init(pack).as_ref()
                    })
                    .flatten();
                let pw = half.unwrap_or_else(|| c.direct.get_or_init(pack));
                direct::conv_forward(g, x, pw, bias, relu)
            }
            None => direct::conv_forward(g, x, &pack(), bias, relu),
        }
    } else {
        conv2d_forward_gemm(g, x, wt, bias, relu)
    }
}

/// Gradient w.r.t. the input: `(b,c,h,w)` from `dy (b,k,oh,ow)`.
///
/// For stride 1, where the direct kernel runs ([`direct::runs`]), this is the direct forward
/// kernel run on `dy` with the transposed, flipped weights (padding `kh − 1 − pad`);
/// otherwise GEMM + col2im.
pub fn conv2d_backward_input(g: &ConvGeom, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    if g.stride == 1 && g.pad < g.kh && g.kh == g.kw {
        if let Some(gt) = ConvGeom::new(g.b, g.k, g.oh, g.ow, g.c, g.kh, g.kw, 1, g.kh - 1 - g.pad)
        {
            if (gt.oh, gt.ow) == (g.h, g.w) && direct::runs(&gt) {
                assert_eq!(dy.len(), g.output_len());
                let wt_flipped = transpose_flip(g, wt);
                return conv2d_forward(&gt, dy, &wt_flipped, None, false, None);
            }
        }
    }
    conv2d_backward_input_gemm(g, dy, wt)
}

/// `w'(c, k, y, x) = w(k, c, kh−1−y, kw−1−x)`: the weights of the input gradient of a stride-1
/// convolution, itself a `k → c` convolution.
fn transpose_flip(g: &ConvGeom, wt: &[f32]) -> Vec<f32> {
    let (kh, kw) = (g.kh, g.kw);
    let mut out = vec![0f32; wt.len()];
    for k in 0..g.k {
        for c in 0..g.c {
            for y in 0..kh {
                for x in 0..kw {
                    out[((c * g.k + k) * kh + y) * kw + x] =
                        wt[((k * g.c + c) * kh + (kh - 1 - y)) * kw + (kw - 1 - x)];
                }
            }
        }
    }
    out
}

/// Gradient w.r.t. the weight: `(k,c,kh,kw)` from `x` and `dy`.
///
/// 3x3 stride-1 layers on a CPU with AVX-512 go through Winograd F(3x3,2x2) or F(3x3,4x4)
/// ([`super::wgrad`]); the rest through im2col + GEMM.
pub fn conv2d_backward_weight(g: &ConvGeom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    if wgrad::applicable(g) {
        return wgrad::conv_backward_weight(g, x, dy);
    }
    conv2d_backward_weight_gemm(g, x, dy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache packing half-precision weights uses them only for maps of at most 16 positions,
    /// and keeps f32 for a layer whose weights do not fit half: the other layers give exactly
    /// the f32 results.
    #[test]
    fn half_weight_cache_scope() {
        if direct::skip_without_direct("half_weight_cache_scope") {
            return;
        }
        let rand = crate::kernels::direct::tests::rand_vec;
        let run = |g: &ConvGeom, wt: &[f32], format| {
            let x = rand(g.input_len(), 1);
            let cache = PackedCache::new(format);
            conv2d_forward(g, &x, wt, None, false, Some(&cache))
        };
        let few = ConvGeom::new(1, 32, 3, 3, 32, 3, 3, 1, 1).unwrap();
        let mut wt = rand(few.weight_len(), 2);
        let (f32y, f16y) = (
            run(&few, &wt, WeightFormat::F32),
            run(&few, &wt, WeightFormat::F16),
        );
        assert_ne!(f32y, f16y, "few positions: half weights in use");
        wt[3] = 1e5;
        assert_eq!(
            run(&few, &wt, WeightFormat::F32),
            run(&few, &wt, WeightFormat::F16),
            "beyond half's range"
        );
        // The grid kernel (7x7 stride 2 on 48x48), Winograd (3x3 on 12x12) and the
        // few-positions kernel on 6x6 maps: f32 always.
        for g in [
            ConvGeom::new(1, 1, 48, 48, 64, 7, 7, 2, 3).unwrap(),
            ConvGeom::new(1, 64, 12, 12, 64, 3, 3, 1, 1).unwrap(),
            ConvGeom::new(2, 32, 6, 6, 32, 3, 3, 1, 1).unwrap(),
        ] {
            let wt = rand(g.weight_len(), 3);
            assert_eq!(
                run(&g, &wt, WeightFormat::F32),
                run(&g, &wt, WeightFormat::F16)
            );
        }
    }
}
