//! The micro-tiles that the direct convolution ([`super::direct`]) and Winograd's GEMMs
//! ([`super::winograd`]) share, and the shapes they are called with.
//!
//! - The grid tile ([`avx512::tile`]): 16 output channels × 16 positions in 16 registers, one
//!   vector of positions loaded per row of X and 16 weights broadcast against it.
//! - The few-positions tile ([`avx512::few_tile_any`]): up to [`FEW_POS`] positions × the 16
//!   channels of one or two weight panels, each position's input broadcast against a vector of
//!   weights, for maps too small to fill the grid tile's vectors.
//!
//! - The bf16 grid tile and dot products ([`bf16`]): the same shapes on pairs of bf16 values
//!   (AVX512-BF16), for [`super::precision`].
//!
//! Weights come in panels of [`MR`] output channels (`[rows][MR]`), packed by the caller.
//! The AVX2 forms of the direct kernel keep their own (narrower) tiles in `direct::avx2`.

use super::geom::ConvGeom;

/// Output channels per weight panel.
pub const MR: usize = 16;

/// Output positions per micro-tile of the few-positions kernel.
pub(in crate::kernels) const FEW_POS: usize = 12;

/// A kernel tap of a few-positions tap set: `(tap index, input offset, slot mask)`.
pub(in crate::kernels) type FewTap = (usize, isize, u16);

/// A slot mask with every slot set.
pub(in crate::kernels) const ALL_SLOTS: u16 = u16::MAX;

/// The first panel and the number of panels (2, or 1 for the last of an odd count) of pair
/// `pair` of `panels` weight panels: the few-positions kernels take them two at a time.
pub(in crate::kernels) fn panel_pair(panels: usize, pair: usize) -> (usize, usize) {
    let p = 2 * pair;
    (p, (panels - p).min(2))
}

/// Where a few-positions micro-kernel finds its operands: input channels `chans` of `cl` floats
/// each, `kk` taps per channel in a panel (`[c][kk][MR]`), the second panel (of a pair) `panel`
/// floats after the first, and weights `pf` floats ahead prefetched into L2.
pub(in crate::kernels) struct FewGeo {
    pub chans: (usize, usize),
    pub kk: usize,
    pub cl: usize,
    pub pf: usize,
    pub panel: usize,
}

impl FewGeo {
    /// The channel blocks the few-positions kernels run over, for panels of `kd` rows of
    /// weights of `weight_bytes` each: 8 KiB of weights per panel (all taps), well inside L1.
    /// Every tile runs over one block before the next, so the panels stream in once, in order,
    /// however the tiles split the taps; the tiles' sums wait between blocks. Each weight load
    /// prefetches its twin one block ahead into L2 (AVX-512, into L1: the prefetches evicted
    /// the block in use, 12% slower at batch 8; 16 KiB blocks were 3% slower).
    pub(in crate::kernels) fn blocks(
        g: &ConvGeom,
        kd: usize,
        weight_bytes: usize,
    ) -> impl Iterator<Item = FewGeo> {
        let kk = g.kh * g.kw;
        let cb = ((8 << 10) / (weight_bytes * kk * MR)).max(1);
        let (c, cl, panel) = (g.c, g.h * g.w, kd * MR);
        (0..c).step_by(cb).map(move |c0| FewGeo {
            chans: (c0, (c0 + cb).min(c)),
            kk,
            cl,
            pf: cb * kk * MR,
            panel,
        })
    }
}

#[cfg(target_arch = "x86_64")]
pub(in crate::kernels) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(in crate::kernels) mod bf16;
