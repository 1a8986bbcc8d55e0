//! Custom candle ops for the encoder's hot paths: convolution (forward, input and weight
//! gradients), a fused conv + bias + ReLU for inference with batch-norm folded in, an overlapping
//! max-pool with backward, and fused training-mode batch-norm and CBAM gates with backward.
//!
//! Layout, from the ground up: [`geom`] (shapes only); [`reference`](mod@reference) (im2col + GEMM and pooling,
//! the portable path every fast path is tested against); the fast paths [`winograd`]
//! (F(2x2,3x3), F(4x4,3x3)), [`direct`] (implicit GEMM on an AVX-512 micro-kernel), [`wgrad`],
//! [`bn`] and [`cbam`], over the micro-tiles of [`microkernel`] and the instruction sets that
//! [`isa`] finds, in the arithmetic [`precision`] sets (f32, or bf16 GEMMs in training);
//! [`conv`], the per-layer choice between them; the candle custom ops that wrap them, [`ops`];
//! and the layer functions the model calls, [`layers`]. candle's built-in ops are the reference
//! in the parity tests (`tests/kernels.rs`). Tensors on other devices fall back to candle's
//! ops, so the model code is device-agnostic. The CARD sampler's kernels ([`sampler`], [`dense`], [`softplus`]) work on
//! plain slices.

/// Calls `$avx::$f` (a loop compiled with `#[target_feature(enable = "avx512f")]`) where the CPU
/// has AVX-512, else the baseline build `$base::$f` of the same loop.
macro_rules! avx512_or {
    ($avx:ident, $base:ident, $f:ident($($a:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::kernels::isa::avx512() {
                // SAFETY: AVX-512F is present (checked at run time).
                unsafe { $avx::$f($($a),*) }
            } else {
                $base::$f($($a),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $base::$f($($a),*)
        }
    }};
}

/// Defines the given loops twice: in module `$base` for the baseline target, inlined into their
/// callers, and in module `$avx`, the same code compiled with `#[target_feature(enable =
/// "avx512f")]` (wider vectors). Callers pick one with [`avx512_or!`].
macro_rules! avx512_twins {
    (
        $(#[$doc:meta])*
        $base:ident, $avx:ident;
        $(
            $(#[$m:meta])*
            pub fn $f:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block
        )*
    ) => {
        $(#[$doc])*
        mod $base {
            $(
                $(#[$m])*
                #[inline(always)]
                #[allow(clippy::too_many_arguments)]
                pub fn $f($($a: $t),*) $(-> $r)? $body
            )*
        }

        /// The same loops compiled for AVX-512.
        #[cfg(target_arch = "x86_64")]
        mod $avx {
            $(
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                pub fn $f($($a: $t),*) $(-> $r)? {
                    super::$base::$f($($a),*)
                }
            )*
        }
    };
}

/// `M` sums `Σ f(a[i], b[i], …)` over the columns `cols` (up to the shortest), each in 16
/// independent f32 lanes so that the compiler vectorises the loop (a single running sum is a
/// dependency chain it must keep in order), then added up in f64. `f` sees one value of each
/// column; the columns are read in chunks of 16, one bounds check per column per chunk.
#[inline(always)]
pub(crate) fn lane_sums<const N: usize, const M: usize>(
    cols: [&[f32]; N],
    f: impl Fn([f32; N]) -> [f32; M],
) -> [f64; M] {
    let n = cols.iter().map(|c| c.len()).min().unwrap_or(0);
    let full = n - n % 16;
    let mut acc = [[0f32; 16]; M];
    let mut base = 0;
    while base < full {
        let chunk: [&[f32; 16]; N] = cols.map(|c| {
            c[base..base + 16]
                .try_into()
                .expect("16 floats (inside the shortest column)")
        });
        for l in 0..16 {
            for (a, v) in acc.iter_mut().zip(f(chunk.map(|c| c[l]))) {
                a[l] += v;
            }
        }
        base += 16;
    }
    let mut total = acc.map(|lanes| lanes.iter().map(|&v| v as f64).sum::<f64>());
    for i in full..n {
        for (t, v) in total.iter_mut().zip(f(cols.map(|c| c[i]))) {
            *t += v as f64;
        }
    }
    total
}

pub mod bn;
pub mod cbam;
pub mod conv;
pub mod dense;
pub mod direct;
pub mod geom;
pub mod isa;
pub mod microkernel;
pub mod precision;
pub mod reference;
pub mod sampler;
pub mod softplus;
#[cfg(test)]
mod test_util;
pub mod wgrad;
pub mod winograd;

pub mod layers;
pub mod ops;

pub use layers::{
    batch_norm_train, cbam_residual_relu, cbam_train_residual_relu, channel_pool, conv2d,
    conv2d_bias_act, max_pool2d,
};

/// Which implementation the encoder's convolutions and pools use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvKernels {
    /// fer-cam's GEMM kernels on CPU tensors (candle's ops elsewhere).
    #[default]
    Fast,
    /// candle's built-in conv2d / max-pool everywhere (the reference).
    Candle,
}

/// How the inference path stores the convolution weights it packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// f32, as trained.
    #[default]
    F32,
    /// IEEE half precision for the layers of at most 16 output positions (4x4) per image;
    /// every product and sum stays f32.
    ///
    /// With the 7x7 stem these are stages 3 and 4 (3x3 and 2x2 maps), over 90% of the encoder's
    /// weights, which at batch 1 stream from memory for a few products each; the 3x3 stem has
    /// no such layer. Each BN-folded weight is rounded once (relative error ≤ 2⁻¹¹); a layer
    /// with a weight beyond half's range keeps f32.
    F16,
}

impl WeightFormat {
    /// `f32` or `f16`, as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// `len` zeros in a vector with capacity for `extra` more floats: a custom op's flat output that
/// gets small parts appended without a reallocation (which would copy the large part).
pub(crate) fn zeros_with_room(len: usize, extra: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + extra);
    v.resize(len, 0.0);
    v
}
