//! Which instruction sets the CPU kernels run with, detected once per process.
//!
//! Three switches turn the fast paths off for tests and comparisons:
//! - `FER_CAM_NO_AVX512=1`: no AVX-512 kernels (the direct convolution then runs its AVX2 form
//!   where the CPU has one; Winograd and its weight gradient, AVX-512 only, give way to the direct
//!   kernel and the GEMM path);
//! - `FER_CAM_NO_AVX2=1`: no AVX2 kernels either (the direct convolution's AVX2 form, and the
//!   CARD sampler's AVX2 + FMA dense and softplus loops);
//! - both: the portable path everywhere, [`portable`].
//!
//! Every kernel asks here, so one pair of variables reaches them all; [`describe`] names what
//! runs, and a test under `FER_CAM_REQUIRE_PORTABLE=1` (CI's second pass) checks that it is
//! the portable path, so a misspelt variable cannot quietly retest the vector kernels.

use std::sync::OnceLock;

/// A vector instruction set of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 512-bit vectors.
    Avx512,
    /// AVX2 with FMA and F16C: 256-bit vectors (every x86-64 CPU since about 2013).
    Avx2,
}

impl Isa {
    /// Whether this CPU has the instruction set, whatever the `FER_CAM_NO_*` switches say.
    pub fn supported(self) -> bool {
        match self {
            Self::Avx512 => detect_avx512(),
            Self::Avx2 => detect_avx2(),
        }
    }

    /// Whether the kernels may use it here: supported and not switched off.
    pub fn enabled(self) -> bool {
        static ENABLED: OnceLock<[bool; 2]> = OnceLock::new();
        let on = ENABLED.get_or_init(|| {
            let off = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
            [
                !off("FER_CAM_NO_AVX512") && detect_avx512(),
                !off("FER_CAM_NO_AVX2") && detect_avx2(),
            ]
        });
        on[self as usize]
    }
}

/// Whether the AVX-512 kernels run here (Winograd, its weight gradient, the direct convolution's
/// 512-bit form, and the loops compiled twice by `avx512_twins!`).
pub fn avx512() -> bool {
    Isa::Avx512.enabled()
}

/// Whether the bf16 GEMMs of [`super::precision`] can run here: AVX-512 on, and AVX512-BF16
/// (`vdpbf16ps`, Zen 4, Sapphire Rapids and later).
pub fn avx512_bf16() -> bool {
    static BF16: OnceLock<bool> = OnceLock::new();
    avx512() && *BF16.get_or_init(detect_avx512_bf16)
}

/// The instruction set the direct convolution runs with here, if any (`None`: the GEMM path).
pub fn direct() -> Option<Isa> {
    [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.enabled())
}

/// Whether the CARD sampler's dense and softplus loops take their AVX2 + FMA form (FMA and AVX2
/// are part of [`Isa::Avx2`]; F16C, which they do not need, is on every CPU with both).
pub fn avx2_fma() -> bool {
    Isa::Avx2.enabled()
}

/// Whether every kernel takes its portable (scalar or auto-vectorised baseline) form.
pub fn portable() -> bool {
    direct().is_none()
}

/// What runs here, for logs and tests: `"avx512"`, `"avx2"` or `"portable"`.
pub fn describe() -> &'static str {
    match direct() {
        Some(Isa::Avx512) => "avx512",
        Some(Isa::Avx2) => "avx2",
        None => "portable",
    }
}

/// Checks an environment variable that demands a path: under `FER_CAM_REQUIRE_PORTABLE`,
/// `FER_CAM_REQUIRE_AVX512` or `FER_CAM_REQUIRE_DIRECT` set to anything but empty, the matching
/// path must be what runs. Returns a description of the mismatch, if any.
pub fn required_path_mismatch() -> Option<String> {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let now = describe();
    if set("FER_CAM_REQUIRE_PORTABLE") && !portable() {
        return Some(format!(
            "FER_CAM_REQUIRE_PORTABLE is set but {now} kernels run"
        ));
    }
    if set("FER_CAM_REQUIRE_AVX512") && !avx512() {
        return Some(format!(
            "FER_CAM_REQUIRE_AVX512 is set but {now} kernels run"
        ));
    }
    if set("FER_CAM_REQUIRE_DIRECT") && direct().is_none() {
        return Some("FER_CAM_REQUIRE_DIRECT is set but no direct kernel runs".into());
    }
    None
}

/// For tests of the direct kernel on any instruction set: `true` (skip, with a SKIPPED notice)
/// where neither runs. With `FER_CAM_REQUIRE_DIRECT=1` (CI sets it on CPUs with AVX2 or
/// AVX-512) a missing kernel is a failure instead.
#[cfg(test)]
pub(crate) fn skip_without_direct(test: &str) -> bool {
    skip_unless(
        test,
        direct().is_some(),
        "FER_CAM_REQUIRE_DIRECT",
        "neither AVX-512F nor AVX2+FMA+F16C on this CPU (or both disabled)",
    )
}

/// For tests of the AVX-512 kernels: `true` (skip, with a SKIPPED notice on stderr) where they
/// cannot run. With `FER_CAM_REQUIRE_AVX512=1` (CI sets it on CPUs that have AVX-512) a missing
/// path is a failure instead, so a broken detection cannot pass as a skip.
#[cfg(test)]
pub(crate) fn skip_without_avx512(test: &str) -> bool {
    skip_unless(
        test,
        avx512(),
        "FER_CAM_REQUIRE_AVX512",
        "no AVX-512F on this CPU (or FER_CAM_NO_AVX512 is set)",
    )
}

/// For tests of the bf16 kernels: `true` (skip, with a SKIPPED notice) where the CPU lacks
/// AVX512-BF16. With `FER_CAM_REQUIRE_BF16=1` a missing path is a failure instead.
#[cfg(test)]
pub(crate) fn skip_without_bf16(test: &str) -> bool {
    skip_unless(
        test,
        avx512_bf16(),
        "FER_CAM_REQUIRE_BF16",
        "no AVX512-BF16 on this CPU (or FER_CAM_NO_AVX512 is set)",
    )
}

/// `false` where `runs`; else a failure under `require` (set and not empty), or `true` after a
/// SKIPPED notice saying `why`.
#[cfg(test)]
fn skip_unless(test: &str, runs: bool, require: &str, why: &str) -> bool {
    if runs {
        return false;
    }
    assert!(
        std::env::var_os(require).is_none_or(|v| v.is_empty()),
        "{test}: {require} is set but the kernels it asks for are unavailable"
    );
    eprintln!("SKIPPED {test}: {why}");
    true
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512_bf16() -> bool {
    std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_bf16() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}
