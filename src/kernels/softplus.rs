//! `softplus(a ⊙ x + b)` over rows, written so the compiler vectorises it: branch-free `exp` and
//! `log1p` polynomials (relative error below 1e-6 over the whole f32 range) instead of libm calls,
//! compiled twice — for the baseline target and for AVX2+FMA, chosen at run time. The reference
//! twin is [`softplus_ref`] (f64 libm), compared in this module's tests.

/// `softplus(x) = max(x, 0) + ln(1 + e^(−|x|))` in f64: the reference.
pub fn softplus_ref(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `e^x` for `x ≤ 0` (inputs below −87 give ≈ e^−87 instead of a denormal; softplus adds it to
/// a number ≥ 0, so the difference is below f32 resolution).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the integer in `shifted`'s mantissa.
    let ni = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `ln(1 + u)` for `u ∈ [0, 1]`: `2·atanh(s)` with `s = u/(2 + u) ≤ 1/3`, as a series in s².
#[inline(always)]
fn log1p_unit(u: f32) -> f32 {
    let s = u / (2.0 + u);
    let w = s * s;
    let mut p = 1.0 / 13.0f32;
    p = p * w + 1.0 / 11.0;
    p = p * w + 1.0 / 9.0;
    p = p * w + 1.0 / 7.0;
    p = p * w + 1.0 / 5.0;
    p = p * w + 1.0 / 3.0;
    p = p * w + 1.0;
    2.0 * s * p
}

#[inline(always)]
fn softplus(x: f32) -> f32 {
    x.max(0.0) + log1p_unit(exp_nonpositive(-x.abs()))
}

#[inline(always)]
fn rows(v: &mut [f32], scale: &[f32], shift: &[f32]) {
    for row in v.chunks_exact_mut(scale.len()) {
        for ((x, a), b) in row.iter_mut().zip(scale).zip(shift) {
            *x = softplus(*a * *x + *b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2(v: &mut [f32], scale: &[f32], shift: &[f32]) {
    rows(v, scale, shift)
}

/// `v = softplus(scale ⊙ v + shift)` for every row of `v` (rows of `scale.len()` values;
/// `shift` has the same length as `scale`).
pub fn scale_shift_softplus(v: &mut [f32], scale: &[f32], shift: &[f32]) {
    assert_eq!(scale.len(), shift.len(), "scale and shift lengths");
    if scale.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::isa::avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked at run time, `isa::avx2_fma`).
            unsafe { rows_avx2(v, scale, shift) };
            return;
        }
    }
    rows(v, scale, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_over_the_f32_range() {
        let mut worst = 0f64;
        let mut xs: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([
            -1e30, -200.0, -88.5, -87.0, -50.0, 50.0, 88.0, 1e30, 0.0, -0.0,
        ]);
        let mut v = xs.clone();
        scale_shift_softplus(&mut v, &[1.0], &[0.0]);
        let mut portable = xs.clone();
        rows(&mut portable, &[1.0], &[0.0]);
        for ((&x, &got), &p) in xs.iter().zip(&v).zip(&portable) {
            let want = softplus_ref(x as f64);
            let rel = (got as f64 - want).abs() / want.abs().max(1e-30);
            // Far below zero softplus is e^x; past −87 both are ≈ 0 in absolute terms.
            let ok = rel < 1e-6 || (x < -80.0 && (got as f64 - want).abs() < 1e-35);
            assert!(ok, "softplus({x}) = {got}, want {want}");
            assert!(got.to_bits() == p.to_bits() || (got - p).abs() <= 1e-6 * p.abs());
            if x > -80.0 {
                worst = worst.max(rel);
            }
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
    }

    #[test]
    fn applies_scale_and_shift_per_column() {
        let mut v = vec![1.0f32, 2.0, -1.0, 0.5];
        scale_shift_softplus(&mut v, &[2.0, -1.0], &[0.5, 1.0]);
        let want = [2.5, -1.0, -1.5, 0.5].map(|z: f64| softplus_ref(z) as f32);
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
        }
    }
}
