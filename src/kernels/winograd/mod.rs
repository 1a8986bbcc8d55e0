//! Winograd F(2x2, 3x3) for 3x3 stride-1 padding-1 convolutions (Lavin & Gray, 2016), on the
//! AVX-512 micro-tiles of [`super::microkernel`].
//!
//! Each 2x2 output tile comes from a 4x4 input tile `d`: `Y = Aᵀ [ Σ_c (G g Gᵀ) ⊙ (Bᵀ d B) ] A`.
//! The element-wise product summed over input channels is 16 independent GEMMs, one per position
//! ξ of the 4x4 transformed tile: `M_ξ (K, tiles) = U_ξ (K, C) · V_ξ (C, tiles)`. That is 16·C·K
//! multiply-adds per tile instead of 36·C·K, 2.25x fewer.
//!
//! - `U = G g Gᵀ` is computed and packed into [`MR`]-channel panels once per weight tensor.
//! - Tiles of all images are numbered densely (`n`, tile row, tile column) and processed in blocks
//!   sized so that a block's `V` and `M` stay in L2. Per block: the input transform writes `V`
//!   (16 tiles per vector: even/odd de-interleaving of padded input rows), the GEMMs write `M`,
//!   and the output transform adds the bias, applies ReLU and stores the 2x2 tiles (interleaving
//!   back).
//! - Blocks run in parallel when there are enough of them; otherwise each stage of the single
//!   block is split across the cores.
//!
//! The transforms only add and subtract (and halve, for `U`), so the result differs from direct
//! convolution by float rounding only; the parity tests bound it.
//!
//! [`transform`] holds what the forward convolution and the weight gradient
//! ([`super::wgrad`]) share; [`forward`] the forward convolution. When it runs is decided in
//! [`super::conv`].

pub(in crate::kernels) mod transform;

mod forward;

pub use forward::{conv_forward, PackedWinograd};

use super::geom::ConvGeom;

/// Whether F(2x2, 3x3) computes this convolution (3x3, stride 1, padding 1).
pub fn applicable(g: &ConvGeom) -> bool {
    (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1)
}
