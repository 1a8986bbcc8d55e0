//! The per-layer choice of convolution path, in one place: Winograd (AVX-512) for 3x3 stride-1
//! layers with enough tiles ([`winograd_tile_size`]), the direct kernel (AVX-512 or AVX2) for
//! the rest ([`direct_runs`]), the im2col + GEMM reference where the CPU has neither; half
//! precision weights where they pay ([`half_weights_pay`]); the weight gradient's Winograd tile
//! ([`wgrad_tile_size`]); and the cache of packed weights the fast paths use in inference. The
//! kernels themselves only check that they can compute a layer, never whether they should.

use std::sync::OnceLock;

use super::geom::ConvGeom;
use super::isa::{self, Isa};
use super::reference::{
    conv2d_backward_input_gemm, conv2d_backward_weight_gemm, conv2d_forward_gemm,
};
use super::{direct, precision, wgrad, winograd, WeightFormat};

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
/// Picks the kernel: Winograd (F(4x4,3x3) or F(2x2,3x3), [`winograd_tile_size`]) for 3x3
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
    if let Some(m) = winograd_tile_size(g) {
        let pack = || winograd::PackedWinograd::pack(wt, g.k, g.c, m);
        match cache {
            Some(c) => {
                let slot = &c.winograd[usize::from(m == 4)];
                winograd::conv_forward(g, x, slot.get_or_init(pack), bias, relu)
            }
            // Training (and the input gradient) packs per call; bf16 where it is in force, on
            // F(2x2) tiles only ([`bf16_pays`]).
            None if bf16_pays(g, m) => {
                winograd::conv_forward(g, x, &pack().with_bf16(), bias, relu)
            }
            None => winograd::conv_forward(g, x, &pack(), bias, relu),
        }
    } else if direct_runs(g) {
        let pack = || direct::PackedWeights::pack(wt, g.k, g.c, g.kh, g.kw);
        match cache {
            Some(c) => {
                let half = (c.format == WeightFormat::F16 && half_weights_pay(g))
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
/// For stride 1, where the direct kernel runs ([`direct_runs`]), this is the direct forward
/// kernel run on `dy` with the transposed, flipped weights (padding `kh − 1 − pad`);
/// otherwise GEMM + col2im.
pub fn conv2d_backward_input(g: &ConvGeom, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    if g.stride == 1 && g.pad < g.kh && g.kh == g.kw {
        if let Some(gt) = ConvGeom::new(g.b, g.k, g.oh, g.ow, g.c, g.kh, g.kw, 1, g.kh - 1 - g.pad)
        {
            if (gt.oh, gt.ow) == (g.h, g.w) && direct_runs(&gt) {
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
        // In bf16, F(3x3, 2x2) everywhere: it beat f32 at either tile size ([`bf16_pays`]).
        let m = if bf16_pays(g, 2) {
            2
        } else {
            wgrad_tile_size(g)
        };
        return wgrad::conv_backward_weight(g, x, dy, m, bf16_pays(g, m));
    }
    conv2d_backward_weight_gemm(g, x, dy)
}

/// The Winograd tile size for this convolution, if Winograd beats the direct kernel here
/// (measured with `examples/conv_gflops.rs` and whole-encoder runs): 4 on maps of at least 24x24
/// (12x12 for layers of 64 channels or more), where F(4x4,3x3) needs 2.25 multiplications per
/// output against F(2x2,3x3)'s 4; 2 on smaller maps, where 4x4 tiles waste too much.
///
/// With few tiles (over the batch) the fixed costs dominate unless the layer is wide (from 64
/// channels: the 7x7 stem's 12x12 layer at batch 1 in 9 tiles of F(4x4) made the whole
/// forward 7% faster than the direct kernel, and 4% at batch 8 against F(2x2)), and with
/// fewer still, streaming the larger transformed weights from memory costs more than the
/// multiplications saved. With a handful of input channels (the stem) the transforms cost more
/// than the GEMMs. Tiny maps (6x6 and smaller) below 64 tiles stay with the direct kernel's
/// few-positions form, which fills its vectors from the whole batch (measured at batch 8: 3x3
/// and 2x2 maps 20% faster than F(2x2)), except 6x6 maps of 256 channels or more: there
/// F(2x2)'s 2.25x fewer multiplications win even at batch 1 (3x3 stem at batch 1 7% faster;
/// at 128 channels, no gain).
pub fn winograd_tile_size(g: &ConvGeom) -> Option<usize> {
    let tiles = g.b * g.oh.div_ceil(2) * g.ow.div_ceil(2);
    let wins = winograd::applicable(g)
        && isa::avx512()
        && g.c >= 8
        && (tiles >= 64
            || (tiles >= 32 && g.c >= 64 && !direct::few_positions(g))
            || (g.oh.min(g.ow) >= 6 && g.c >= 256));
    match wins {
        false => None,
        true if g.oh.min(g.ow) >= if g.c >= 64 { 12 } else { 24 } => Some(4),
        true => Some(2),
    }
}

/// Whether a Winograd layer with tiles of `m` runs its GEMMs in bf16: where
/// [`precision::bf16_now`], on F(2x2) tiles (and for the forward GEMM an even channel count).
/// The forward keeps the f32 rule's tile ([`winograd_tile_size`]), so its F(4x4) layers stay
/// f32; the weight gradient takes F(3x3, 2x2) in bf16 on every layer.
///
/// F(4x4)'s transforms scale values by up to 8 per side, and bf16's rounding of the transformed
/// operands (2⁻⁹) then reached 6.5% of the largest output in the parity tests (F(2x2): 0.4%).
/// Measured on the paper's network's 3x3 layers in training (batch 64, 24x24 to 3x3 maps,
/// `examples/conv_gflops.rs -- full`, 2-core Zen 4, ms): the forward in bf16 F(2x2) 6.2, 5.2,
/// 4.9, 7.9 against f32's choice 5.7 (F(4x4)), 4.8 (F(4x4)), 6.4, 10.8; the weight gradient in
/// bf16 F(3x3, 2x2) 6.7, 6.3, 6.0, 12.5 against f32's choice 7.2, 6.7 (F(3x3, 4x4)), 8.2, 18.8
/// (F(3x3, 4x4)).
pub fn bf16_pays(g: &ConvGeom, m: usize) -> bool {
    m == 2 && g.c.is_multiple_of(2) && precision::bf16_now()
}

/// Whether the direct kernel ([`direct::conv_forward`]) runs this convolution here (otherwise the GEMM path does): always
/// with AVX-512; with AVX2, for kernels wider than 1x1 with at least 64 products per output.
///
/// The AVX2 kernel stores its tiles a value at a time, which a handful of products per output
/// does not repay: measured with `examples/conv_gflops.rs` on a 2-core AMD EPYC without AVX-512
/// (the shipped model's layers), the stem (1 channel, 9 products) took 1.0–7x as long as the
/// GEMM path and its 1x1 stride-2 shortcuts up to 6x at batch 1 and 2, while the 3x3 layers
/// from 32 channels took 0.4–0.9x as long on both cores at batch 1, 2 and 64 (on one core at
/// batch 1 the stride-2 ones were up to 1.5x slower).
pub fn direct_runs(g: &ConvGeom) -> bool {
    match isa::direct() {
        Some(Isa::Avx512) => true,
        Some(Isa::Avx2) => g.kh * g.kw > 1 && g.ckk() >= 64,
        None => false,
    }
}

/// Whether [`WeightFormat::F16`](super::WeightFormat::F16) weights are used for this layer:
/// maps of at most 16 positions (4x4) per image, where at batch 1 each weight serves at most 16
/// products and the layer waits for its weights more than it multiplies them. On 6x6 maps
/// (36 products) half weights gained nothing: the 7x7 stem's forward at batch 1 took 1.11 ms
/// with its 6x6 stage in f32 and 1.12 ms in half, and the 3x3 stem's was slower with its one
/// 6x6 few-positions layer in half.
pub fn half_weights_pay(g: &ConvGeom) -> bool {
    direct::few_positions(g) && g.oh * g.ow <= 16
}

/// The weight gradient's Winograd tile for `g` (where [`wgrad::applicable`]): 4 where
/// F(3x3, 4x4) needs at least 20% fewer multiplications than F(3x3, 2x2) once partial tiles are
/// counted, else 2. In the encoder that is 4 on the maps of 12x12 and up and 2 on 6x6, where
/// `examples/conv_gflops.rs` measured F(3x3, 4x4) slower.
pub fn wgrad_tile_size(g: &ConvGeom) -> usize {
    let mults = |m: usize| (m + 2) * (m + 2) * g.oh.div_ceil(m) * g.ow.div_ceil(m);
    if 5 * mults(4) < 4 * mults(2) {
        4
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache packing half-precision weights uses them only for maps of at most 16 positions,
    /// and keeps f32 for a layer whose weights do not fit half: the other layers give exactly
    /// the f32 results.
    #[test]
    fn half_weight_cache_scope() {
        if isa::skip_without_direct("half_weight_cache_scope") {
            return;
        }
        let rand = crate::kernels::test_util::rand_vec;
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
