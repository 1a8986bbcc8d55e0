//! A dense layer's product for few rows and a fixed weight: `out (rows, d_out) = x (rows, d_in) ·
//! W_t (d_in, d_out)`, where `W_t` is the weight transposed once, up front ([`Dense::new`]).
//! Through a general GEMM the CARD sampler's 32-row products spent as long packing the 256x256
//! weight as multiplying; here each 6-row x 16-column block of the output stays in registers
//! while `k` runs over `d_in`, reading `W_t` rows straight from memory. Compiled for the baseline
//! target and for AVX2+FMA (chosen at run time). The reference twin is [`super::reference::sgemm`],
//! compared in this module's tests.

/// Columns of one output block (two AVX registers).
const COLS: usize = 16;
/// Rows of one output block: 6 x 2 accumulators + 2 weight loads + 1 broadcast fit 16 registers.
const ROWS: usize = 6;

/// A weight `(d_out, d_in)` stored transposed for [`Dense::forward`].
#[derive(Debug, Clone)]
pub struct Dense {
    /// `(d_in, d_out)` row-major.
    wt: Vec<f32>,
    /// `(d_out, d_in)` row-major, kept for outputs narrower than a block (dot products).
    w: Vec<f32>,
    pub d_in: usize,
    pub d_out: usize,
}

impl Dense {
    /// From a row-major `(d_out, d_in)` weight (candle's `Linear` layout).
    pub fn new(weight: &[f32], d_out: usize, d_in: usize) -> Self {
        assert_eq!(weight.len(), d_out * d_in, "weight size");
        let mut wt = vec![0f32; d_in * d_out];
        for o in 0..d_out {
            for i in 0..d_in {
                wt[i * d_out + o] = weight[o * d_in + i];
            }
        }
        Self {
            wt,
            w: weight.to_vec(),
            d_in,
            d_out,
        }
    }

    /// The weight as given to [`Dense::new`]: row-major `(d_out, d_in)`.
    pub fn weight(&self) -> &[f32] {
        &self.w
    }

    /// `out = x · Wᵀ` for `rows` rows of `x` (`out` is overwritten).
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(x.len() >= rows * self.d_in, "x too short");
        assert!(out.len() >= rows * self.d_out, "out too short");
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::isa::avx2_fma() {
                // SAFETY: AVX2 and FMA are present (checked at run time, `isa::avx2_fma`).
                unsafe { forward_fma(self, x, rows, out) };
                return;
            }
        }
        forward_all::<false>(self, x, rows, out)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_fma(d: &Dense, x: &[f32], rows: usize, out: &mut [f32]) {
    forward_all::<true>(d, x, rows, out)
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn forward_all<const FMA: bool>(d: &Dense, x: &[f32], rows: usize, out: &mut [f32]) {
    let (d_in, d_out) = (d.d_in, d.d_out);
    let full_cols = d_out - d_out % COLS;
    let mut r = 0;
    while r < rows {
        let nr = ROWS.min(rows - r);
        let xs = &x[r * d_in..(r + nr) * d_in];
        let os = &mut out[r * d_out..(r + nr) * d_out];
        for j in (0..full_cols).step_by(COLS) {
            match nr {
                6 => block::<6, FMA>(xs, &d.wt, d_in, d_out, j, os),
                5 => block::<5, FMA>(xs, &d.wt, d_in, d_out, j, os),
                4 => block::<4, FMA>(xs, &d.wt, d_in, d_out, j, os),
                3 => block::<3, FMA>(xs, &d.wt, d_in, d_out, j, os),
                2 => block::<2, FMA>(xs, &d.wt, d_in, d_out, j, os),
                _ => block::<1, FMA>(xs, &d.wt, d_in, d_out, j, os),
            }
        }
        // Columns past the last whole block: one dot product each, over contiguous rows.
        for i in 0..nr {
            let xr = &xs[i * d_in..(i + 1) * d_in];
            for j in full_cols..d_out {
                os[i * d_out + j] = dot::<FMA>(xr, &d.w[j * d_in..(j + 1) * d_in]);
            }
        }
        r += nr;
    }
}

/// `Σ a_k b_k` with eight partial sums (so the loop vectorises).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] = madd::<FMA>(x[k], y[k], acc[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Output rows `0..R`, columns `j..j + COLS`, of the `R` rows in `xs`.
#[inline(always)]
fn block<const R: usize, const FMA: bool>(
    xs: &[f32],
    wt: &[f32],
    d_in: usize,
    d_out: usize,
    j: usize,
    out: &mut [f32],
) {
    assert!(xs.len() >= R * d_in && j + COLS <= d_out && wt.len() >= d_in * d_out);
    let mut acc = [[0f32; COLS]; R];
    for k in 0..d_in {
        // SAFETY: k < d_in and j + COLS <= d_out, so every index is inside `wt` and `xs` (asserted
        // above); unchecked reads keep the bounds checks out of the innermost loop.
        let w: &[f32; COLS] = unsafe { &*(wt.as_ptr().add(k * d_out + j) as *const [f32; COLS]) };
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = unsafe { *xs.get_unchecked(i * d_in + k) };
            for (c, wv) in a.iter_mut().zip(w) {
                *c = madd::<FMA>(xv, *wv, *c);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        out[i * d_out + j..i * d_out + j + COLS].copy_from_slice(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_the_gemm_reference() {
        let mut g = rand::rngs::StdRng::seed_from_u64(3);
        // Row counts around the 6-row block, widths with and without a partial column block.
        for (rows, d_in, d_out) in [
            (32, 256, 256),
            (13, 7, 256),
            (5, 256, 7),
            (1, 3, 20),
            (7, 40, 33),
        ] {
            let w: Vec<f32> = (0..d_out * d_in).map(|_| g.random::<f32>() - 0.5).collect();
            let x: Vec<f32> = (0..rows * d_in).map(|_| g.random::<f32>() - 0.5).collect();
            let mut want = vec![0f32; rows * d_out];
            crate::kernels::reference::sgemm(
                rows, d_out, d_in, &x, d_in, 1, &w, 1, d_in, &mut want, d_out, false, 1,
            );
            let dense = Dense::new(&w, d_out, d_in);
            let mut got = vec![f32::NAN; rows * d_out];
            dense.forward(&x, rows, &mut got);
            let mut portable = vec![f32::NAN; rows * d_out];
            forward_all::<false>(&dense, &x, rows, &mut portable);
            for ((a, b), p) in got.iter().zip(&want).zip(&portable) {
                let tol = 1e-5 * d_in as f32;
                assert!(
                    (a - b).abs() < tol && (p - b).abs() < tol,
                    "{rows}x{d_in}x{d_out}: {a} {p} vs {b}"
                );
            }
        }
    }
}
