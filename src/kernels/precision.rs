//! The arithmetic of training's convolutions: f32 (the reference, and the default) or bf16
//! operands with f32 sums where the CPU has AVX512-BF16.
//!
//! With [`Precision::Bf16`] in force ([`scope`]), the F(2x2) GEMMs of Winograd's forward
//! convolution (which also computes the input gradient of the 3x3 stride-1 layers) and of its
//! weight gradient round their transformed operands to bfloat16 (8 significant bits, round to
//! nearest even) and multiply them in pairs with `vdpbf16ps`, accumulating in f32: twice the
//! products per instruction and half the bytes of the operands. Which layers, and why not
//! F(4x4): [`super::conv::bf16_pays`]. The transforms, the other layers
//! (the stem, the stride-2 and 1x1 convolutions, batch norm, CBAM), the optimiser and the
//! weights stay f32. Only the training steps run under it ([`crate::train`] opens the scope
//! around each step); validation, `eval` and `run` always compute in f32.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Operand precision of the training convolutions' GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands: the reference.
    #[default]
    F32,
    /// bf16 operands, f32 sums, where the CPU has AVX512-BF16 (elsewhere f32).
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`, as configs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// Whether this precision's kernels run here: always for f32; for bf16 where the CPU has
    /// AVX512-BF16 and the AVX-512 kernels are on.
    pub fn available(self) -> bool {
        match self {
            Self::F32 => true,
            Self::Bf16 => super::isa::avx512_bf16(),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        [Self::F32, Self::Bf16]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                crate::error::Error::Config(format!(
                    "precision {s:?} is unknown (allowed: f32, bf16)"
                ))
            })
    }
}

static BF16: AtomicBool = AtomicBool::new(false);

/// Whether the bf16 GEMMs run now: inside a [`scope`] of [`Precision::Bf16`] on a CPU that
/// has them.
pub fn bf16_now() -> bool {
    BF16.load(Ordering::Relaxed) && Precision::Bf16.available()
}

/// Sets the precision of the convolutions started until the guard drops, which restores the
/// one before. The setting is process-wide: the training loop holds it around its steps, on
/// the thread that runs them.
pub fn scope(p: Precision) -> Scope {
    let before = BF16.swap(p == Precision::Bf16, Ordering::Relaxed);
    Scope { before }
}

/// Restores the precision that was in force before [`scope`].
#[must_use = "the precision holds until the guard drops"]
pub struct Scope {
    before: bool,
}

impl Drop for Scope {
    fn drop(&mut self) {
        BF16.store(self.before, Ordering::Relaxed);
    }
}
