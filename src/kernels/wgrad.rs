//! Weight gradient of 3x3 stride-1 padding-1 convolutions by Winograd F(3x3, 2x2) and
//! F(3x3, 4x4).
//!
//! The weight gradient `dW[k][c][u][v] = Σ_{n,y,x} dY[n][k][y][x] · Xpad[n][c][y+u][x+v]` is a
//! correlation with a 3x3 output. Split the sum over output positions into the m x m tiles of
//! [`super::winograd`]'s F(m x m, 3x3); each tile's share is a 3x3 correlation of its
//! `(m+2)²` input patch `D` with its m x m gradient tile `E`. That is F(3x3, m x m), and
//! transposing F(m x m, 3x3) (the weight is the argument the forward algorithm is linear in)
//! gives it with that algorithm's own matrices:
//!
//! `dW[k][c] = Gᵀ [ Σ_tiles (A E_k Aᵀ) ⊙ (Bᵀ D_c B) ] G`
//!
//! - `Bᵀ D B` is the forward input transform, unchanged.
//! - `A E Aᵀ` (with `A` the transpose of the forward `Aᵀ`) transforms the gradient tiles.
//! - Summed over tiles, the element-wise products are `(m+2)²` GEMMs with the tiles as the
//!   reduction: `M_ξ (K, C) = U_ξ (K, tiles) · V_ξ (C, tiles)ᵀ`. Per output position that is
//!   4·K·C multiply-adds for m = 2 and 2.25·K·C for m = 4, against the direct 9·K·C.
//! - `Gᵀ M G` turns the `(m+2)²` values of `M` of every `(k, c)` into the 3x3 gradient, once per
//!   call.
//!
//! Both transforms write tiles contiguously (16 per vector), so the GEMM is a set of dot
//! products over tiles: a 4x4 block of `(k, c)` pairs keeps 16 vector accumulators, loads 4 + 4
//! vectors per 16 FMAs, and folds the 16 accumulators into one vector per chunk of tiles.
//! Tiles are processed in chunks so that the transformed chunk stays near the caches.

use rayon::prelude::*;

use super::geom::{ConvGeom, SharedOut};
use super::isa;
use super::winograd;
use super::winograd::transform::{for_each, padded_planes, xi_stride, Scratch, Tiles, G2, G4};

/// Tiles per chunk: the transforms of a chunk are written, then reduced by the GEMMs.
const CHUNK: usize = 1024;
/// Rows of `U_ξ` per GEMM work item: that block (at most 256 KiB per chunk) stays in L2 while
/// the rows of `V_ξ` stream past it, four at a time.
const KB: usize = 64;

/// Whether this path computes the weight gradient of `g`: 3x3, stride 1, padding 1, AVX-512, and
/// channel counts that are multiples of 4 (the GEMM's block).
pub fn applicable(g: &ConvGeom) -> bool {
    winograd::applicable(g) && isa::avx512() && g.k.is_multiple_of(4) && g.c.is_multiple_of(4)
}

/// `dW (k, c, 3, 3)` of a 3x3 stride-1 padding-1 convolution from its input `x (b, c, h, w)` and
/// output gradient `dy (b, k, h, w)`, with output tiles of `m` (2 or 4; which one pays is
/// decided in [`super::conv`]). With `bf16`, the GEMMs round the transformed chunks to bf16
/// and sum their products in f32 ([`super::precision`]).
///
/// Panics unless [`applicable`] (and for `bf16` AVX512-BF16 is present) and the sizes agree.
pub fn conv_backward_weight(g: &ConvGeom, x: &[f32], dy: &[f32], m: usize, bf16: bool) -> Vec<f32> {
    assert!(
        applicable(g),
        "winograd weight gradient: not applicable to {g:?}"
    );
    assert!(
        !bf16 || isa::avx512_bf16(),
        "winograd weight gradient: no AVX512-BF16"
    );
    assert!(
        m == 2 || m == 4,
        "winograd weight gradient: tile size {m} (2 or 4)"
    );
    assert_eq!(x.len(), g.input_len());
    assert_eq!(dy.len(), g.output_len());
    let (c, k, xis) = (g.c, g.k, (m + 2) * (m + 2));
    let tl = Tiles::new(g, m);
    let xp = padded_planes(x, (g.h, g.w), (tl.hp, tl.wp), 1);
    // The gradient padded to whole tiles (m·tiles per side), no offset.
    let dyp = padded_planes(dy, (g.oh, g.ow), (tl.hp - 2, tl.wp - 2), 0);
    let mut mt = vec![0f32; xis * k * c];
    let ms = SharedOut::new(&mut mt);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (&xp, &dyp, ms);
    let mut t0 = 0;
    while t0 < tl.total {
        let t1 = (t0 + CHUNK).min(tl.total);
        let ntp = (t1 - t0).div_ceil(16) * 16;
        let (v_len, u_len) = (xis * xi_stride(c, ntp), xis * xi_stride(k, ntp));
        let mut v_buf = Scratch::take(v_len);
        let mut u_buf = Scratch::take(u_len);
        let v = &mut v_buf.buf[..v_len];
        let u = &mut u_buf.buf[..u_len];
        let (vs, us) = (SharedOut::new(v), SharedOut::new(u));
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (vs, us);
        // SAFETY (both stages): AVX-512F is present (`applicable`); every item writes a disjoint
        // part: the ξ rows of one channel of V or U; the rows k0..k1 of one M_ξ.
        #[cfg(target_arch = "x86_64")]
        for_each(c + k, true, |i| unsafe {
            use crate::kernels::winograd::transform::avx512::{input2, input4};
            if i < c {
                match m {
                    2 => input2(&tl, &xp, c, i, t0, t1, ntp, vs),
                    _ => input4(&tl, &xp, c, i, t0, t1, ntp, vs),
                }
                zero_tails(vs, xis, c, i, t1 - t0, ntp);
            } else {
                match m {
                    2 => avx512::grad2(&tl, &dyp, k, i - c, t0, t1, ntp, us),
                    _ => avx512::grad4(&tl, &dyp, k, i - c, t0, t1, ntp, us),
                }
                zero_tails(us, xis, k, i - c, t1 - t0, ntp);
            }
        });
        let (v, u) = (&*v, &*u);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (u, v, bf16);
        // SAFETY: AVX-512F is present (`applicable`), and AVX512-BF16 for the words (asserted
        // above).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if bf16 {
                let (uw, vw, nw) = to_words(u, v, (k, c, xis), ntp);
                reduce_all(&uw.buf, &vw.buf, ms, (k, c, xis), nw, bf16::dot_words);
            } else {
                reduce_all(u, v, ms, (k, c, xis), ntp, avx512::dot4x4);
            }
        }
        t0 = t1;
    }
    output_transform(&mt, k, c, m)
}

/// `M_ξ[k][c] += Σ_t U_ξ[k][t] · V_ξ[c][t]` for every ξ, from rows of `n` values (f32, or bf16
/// words in float slots) laid out `[ξ][rows][n]`, ξ blocks [`xi_stride`] apart, by `dot`; the
/// cores share the (ξ, block of [`KB`] rows of U) items.
///
/// # Safety
/// AVX-512F and what `dot` needs.
#[cfg(target_arch = "x86_64")]
unsafe fn reduce_all(
    u: &[f32],
    v: &[f32],
    m: SharedOut,
    (k, c, xis): (usize, usize, usize),
    n: usize,
    dot: avx512::Dot,
) {
    let kblocks = k.div_ceil(KB);
    for_each(xis * kblocks, true, |i| {
        let (xi, kb) = (i / kblocks, i % kblocks);
        let (k0, k1) = (kb * KB, ((kb + 1) * KB).min(k));
        let u = &u[xi * xi_stride(k, n)..][..k * n];
        let v = &v[xi * xi_stride(c, n)..][..c * n];
        // SAFETY: the caller's contract; each item writes its own rows k0..k1 of M_ξ.
        unsafe { avx512::reduce(u, v, m, xi, (k0, k1), (k, c), n, dot) };
    });
}

/// One chunk's `u` and `v` (`[ξ][rows][ntp]`, tails zeroed) as bf16 words of consecutive tiles,
/// in the same layout with rows of `nw` words (`ntp/2` rounded up to 16, zero-padded); returns
/// the two buffers and `nw`.
///
/// # Safety
/// AVX-512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
unsafe fn to_words(
    u: &[f32],
    v: &[f32],
    (k, c, xis): (usize, usize, usize),
    ntp: usize,
) -> (Scratch, Scratch, usize) {
    let nw = (ntp / 2).div_ceil(16) * 16;
    let (uw_len, vw_len) = (xis * xi_stride(k, nw), xis * xi_stride(c, nw));
    // The pooled buffers may be longer; only these lengths are written and read.
    let mut uw_buf = Scratch::take(uw_len);
    let mut vw_buf = Scratch::take(vw_len);
    let uw = SharedOut::new(&mut uw_buf.buf[..uw_len]);
    let vw = SharedOut::new(&mut vw_buf.buf[..vw_len]);
    // SAFETY: the caller's contract; each item converts one row (ξ, channel) of U or V into
    // its own row of words, all inside the buffers (asserted).
    for_each(xis * (k + c), true, |i| unsafe {
        let (xi, r) = (i / (k + c), i % (k + c));
        let (src, rows, dst, row) = match r < k {
            true => (u, k, uw, r),
            false => (v, c, vw, r - k),
        };
        let from = xi * xi_stride(rows, ntp) + row * ntp;
        let to = xi * xi_stride(rows, nw) + row * nw;
        assert!(from + ntp <= src.len() && to + nw <= dst.len());
        let dst = dst.ptr().add(to).cast::<u32>();
        for w in (0..nw).step_by(16) {
            if 2 * w + 32 <= ntp {
                bf16::pairs32(src.as_ptr().add(from + 2 * w), dst.add(w));
            } else {
                // A last half vector of tiles (ntp is a multiple of 16), then zeros.
                let mut tail = [0f32; 32];
                let n = ntp.saturating_sub(2 * w).min(32);
                tail[..n].copy_from_slice(&src[from + 2 * w..][..n]);
                bf16::pairs32(tail.as_ptr(), dst.add(w));
            }
        }
    });
    (uw_buf, vw_buf, nw)
}

/// `dW[k][c] = Gᵀ M[k][c] G` for every `(k, c)`, from `M` laid out `[ξ][k][c]`.
///
/// Each of the 9 outputs is a fixed combination of the ξ, so per output channel `k` it is a few
/// dozen multiply-adds over contiguous rows of `c` (vectorised by the compiler); the rows are
/// then interleaved into the `(k, c, 3, 3)` layout.
fn output_transform(mt: &[f32], k: usize, c: usize, m: usize) -> Vec<f32> {
    let gm: &[[f64; 3]] = if m == 2 { &G2 } else { &G4 };
    let a = m + 2;
    // (output uv, ξ, coefficient G[i][u]·G[j][v]) for the non-zero coefficients.
    let mut terms: Vec<(usize, usize, f32)> = Vec::new();
    for uv in 0..9 {
        for xi in 0..a * a {
            let coef = gm[xi / a][uv / 3] * gm[xi % a][uv % 3];
            if coef != 0.0 {
                terms.push((uv, xi, coef as f32));
            }
        }
    }
    let mut dw = vec![0f32; k * c * 9];
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(ko, out)| {
        let mut acc = vec![0f32; 9 * c];
        for &(uv, xi, coef) in &terms {
            let row = &mt[(xi * k + ko) * c..][..c];
            for (d, &s) in acc[uv * c..(uv + 1) * c].iter_mut().zip(row) {
                *d += coef * s;
            }
        }
        for (ci, o) in out.chunks_exact_mut(9).enumerate() {
            for (uv, val) in o.iter_mut().enumerate() {
                *val = acc[uv * c + ci];
            }
        }
    });
    dw
}

/// Zeroes the lanes `used..ntp` of channel `ch`'s `xis` rows (one per ξ) of a transformed
/// chunk: they are summed by the dot products, so they must not hold stale values.
///
/// # Safety
/// `buf` holds `xis·xi_stride(channels, ntp)` floats, and no other thread writes channel `ch`'s
/// rows.
unsafe fn zero_tails(
    buf: SharedOut,
    xis: usize,
    channels: usize,
    ch: usize,
    used: usize,
    ntp: usize,
) {
    assert!(xis * xi_stride(channels, ntp) <= buf.len() && used <= ntp);
    for xi in 0..xis {
        let row = xi * xi_stride(channels, ntp) + ch * ntp;
        // SAFETY: inside the buffer (asserted) and owned by this channel.
        unsafe { std::ptr::write_bytes(buf.ptr().add(row + used), 0, ntp - used) };
    }
}

#[cfg(target_arch = "x86_64")]
mod bf16 {
    use std::arch::x86_64::__m512;

    use crate::kernels::microkernel::bf16::dot4x4;
    pub(super) use crate::kernels::microkernel::bf16::pairs32;

    /// [`dot4x4`] on rows of words kept in float slots, for [`super::avx512::reduce`].
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16; 4 rows of `n` words at `u` and at `v`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot_words(u: *const f32, v: *const f32, n: usize) -> [__m512; 16] {
        // SAFETY: the caller's contract.
        unsafe { dot4x4(u.cast(), v.cast(), n) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{xi_stride, Tiles};
    use crate::kernels::geom::SharedOut;
    use crate::kernels::winograd::transform::avx512::{idx, EVEN, ODD, STRIDE4};

    /// `U_ξ[k][t − t0] = (A E Aᵀ)_ξ` for output channel `k` and tiles `t0..t1`, where `E` is the
    /// tile's 2x2 block of the padded gradient `dyp (b, channels, 2·th, 2·tw)`.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `k` of `u`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn grad2(
        tl: &Tiles,
        dyp: &[f32],
        channels: usize,
        k: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
        u: SharedOut,
    ) {
        let (even, odd) = (idx(&EVEN), idx(&ODD));
        let (hq, wq) = (tl.hp - 2, tl.wp - 2);
        assert!(16 * xi_stride(channels, ntp) <= u.len());
        // A as a column transform: (e0, e1) → (e0, e0 + e1, e0 − e1, −e1).
        let a = |e0: __m512, e1: __m512| {
            [
                e0,
                _mm512_add_ps(e0, e1),
                _mm512_sub_ps(e0, e1),
                _mm512_sub_ps(_mm512_setzero_ps(), e1),
            ]
        };
        for (t, n, ty, tx, len) in tl.runs(t0, t1) {
            let base = (n * channels + k) * hq * wq + 2 * ty * wq + 2 * tx;
            // The farthest read: the second row, 32 floats across (slack covers the overrun).
            assert!(base + wq + 32 <= dyp.len());
            let mut e = [[_mm512_setzero_ps(); 2]; 2];
            for (i, row) in e.iter_mut().enumerate() {
                // SAFETY: asserted above.
                let (lo, hi) = unsafe {
                    let r = dyp.as_ptr().add(base + i * wq);
                    (_mm512_loadu_ps(r), _mm512_loadu_ps(r.add(16)))
                };
                row[0] = _mm512_permutex2var_ps(lo, even, hi);
                row[1] = _mm512_permutex2var_ps(lo, odd, hi);
            }
            // cols[j][i] = (A E)[i][j]; then A again along each row.
            let cols = [a(e[0][0], e[1][0]), a(e[0][1], e[1][1])];
            let mask: __mmask16 = ((1u32 << len) - 1) as u16;
            for (i, (&c0, &c1)) in cols[0].iter().zip(&cols[1]).enumerate() {
                for (j, val) in a(c0, c1).into_iter().enumerate() {
                    let dst = (i * 4 + j) * xi_stride(channels, ntp) + k * ntp + (t - t0);
                    // SAFETY: dst + len <= 16·xi_stride(channels, ntp) (asserted), lanes
                    // past len masked.
                    unsafe { _mm512_mask_storeu_ps(u.ptr().add(dst), mask, val) };
                }
            }
        }
    }

    /// [`grad2`] for F(3x3, 4x4): 4x4 gradient tiles at stride 4, 36 positions ξ.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `k` of `u`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn grad4(
        tl: &Tiles,
        dyp: &[f32],
        channels: usize,
        k: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
        u: SharedOut,
    ) {
        let sel: [__m512i; 4] = std::array::from_fn(|j| idx(&STRIDE4[j]));
        let (hq, wq) = (tl.hp - 2, tl.wp - 2);
        assert!(36 * xi_stride(channels, ntp) <= u.len());
        // A as a column transform, A = (Aᵀ of F(4x4, 3x3))ᵀ:
        // (e0, e1, e2, e3) → (e0, e0+e1+e2+e3, e0−e1+e2−e3, e0+2e1+4e2+8e3, e0−2e1+4e2−8e3, e3).
        let a = |e: [__m512; 4]| {
            let (two, four) = (_mm512_set1_ps(2.0), _mm512_set1_ps(4.0));
            let (even, odd) = (_mm512_add_ps(e[0], e[2]), _mm512_add_ps(e[1], e[3]));
            let even4 = _mm512_fmadd_ps(four, e[2], e[0]);
            let odd4 = _mm512_fmadd_ps(four, e[3], e[1]);
            [
                e[0],
                _mm512_add_ps(even, odd),
                _mm512_sub_ps(even, odd),
                _mm512_fmadd_ps(two, odd4, even4),
                _mm512_fnmadd_ps(two, odd4, even4),
                e[3],
            ]
        };
        for (t, n, ty, tx, len) in tl.runs(t0, t1) {
            let base = (n * channels + k) * hq * wq + 4 * ty * wq + 4 * tx;
            // The farthest read: the fourth row, 64 floats across (slack covers the overrun).
            assert!(base + 3 * wq + 64 <= dyp.len());
            let mut e = [[_mm512_setzero_ps(); 4]; 4];
            for (i, row) in e.iter_mut().enumerate() {
                // SAFETY: asserted above.
                let q: [__m512; 4] = unsafe {
                    let r = dyp.as_ptr().add(base + i * wq);
                    std::array::from_fn(|h| _mm512_loadu_ps(r.add(16 * h)))
                };
                for (val, s) in row.iter_mut().zip(&sel) {
                    let lo = _mm512_permutex2var_ps(q[0], *s, q[1]);
                    let hi = _mm512_permutex2var_ps(q[2], *s, q[3]);
                    *val = _mm512_mask_blend_ps(0xff00, lo, hi);
                }
            }
            // cols[j][i] = (A E)[i][j]; then A again along each row.
            let cols: [[__m512; 6]; 4] =
                std::array::from_fn(|j| a([e[0][j], e[1][j], e[2][j], e[3][j]]));
            let mask: __mmask16 = ((1u32 << len) - 1) as u16;
            // Row i of (A E) Aᵀ is A applied to row i of A E.
            #[allow(clippy::needless_range_loop)]
            for i in 0..6 {
                let row = a([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
                for (j, val) in row.into_iter().enumerate() {
                    let dst = (i * 6 + j) * xi_stride(channels, ntp) + k * ntp + (t - t0);
                    // SAFETY: dst + len <= 36·xi_stride(channels, ntp) (asserted), lanes
                    // past len masked.
                    unsafe { _mm512_mask_storeu_ps(u.ptr().add(dst), mask, val) };
                }
            }
        }
    }

    /// The dot products of 4 x 4 rows of `n` values (f32, or bf16 words in float slots), as
    /// [`dot4x4`] and [`super::bf16::dot_words`] give them.
    pub(super) type Dot = unsafe fn(*const f32, *const f32, usize) -> [__m512; 16];

    /// `M_ξ[k][c] += Σ_t U_ξ[k][t] · V_ξ[c][t]` for rows `k0..k1` (multiples of 4) and every `c`,
    /// from `u` (`k` rows of `n` values of `U_ξ`) and `v` (`c` rows of `V_ξ`), by `dot`.
    ///
    /// # Safety
    /// AVX-512F (and what `dot` needs); no other thread writes rows `k0..k1` of `M_ξ`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn reduce(
        u: &[f32],
        v: &[f32],
        m: SharedOut,
        xi: usize,
        (k0, k1): (usize, usize),
        (k, c): (usize, usize),
        n: usize,
        dot: Dot,
    ) {
        assert!(k1 <= k && n.is_multiple_of(16));
        assert!([k0, k1, c].iter().all(|v| v.is_multiple_of(4)));
        assert!(u.len() >= k * n && v.len() >= c * n);
        assert!(m.len() >= (xi + 1) * k * c);
        let (u, v) = (u.as_ptr(), v.as_ptr());
        for c0 in (0..c).step_by(4) {
            for kk in (k0..k1).step_by(4) {
                // SAFETY: rows kk..kk+4 of U_ξ and c0..c0+4 of V_ξ, n values each (asserted).
                let acc = unsafe { dot(u.add(kk * n), v.add(c0 * n), n) };
                let mut sums = [0f32; 16];
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), hsum16(acc)) };
                for (i, s) in sums.chunks_exact(4).enumerate() {
                    let row = (xi * k + kk + i) * c + c0;
                    for (j, &val) in s.iter().enumerate() {
                        // SAFETY: row kk+i < k1 of M_ξ, column c0+j < c (asserted); owned here.
                        unsafe { *m.ptr().add(row + j) += val };
                    }
                }
            }
        }
    }

    /// The 16 dot products of rows `u + i·ntp` with rows `v + j·ntp` (`i, j < 4`) as 16-lane
    /// partial sums, accumulator `4i + j`.
    ///
    /// # Safety
    /// AVX-512F; 4 rows of `ntp` (a multiple of 16) floats at `u` and at `v`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn dot4x4(u: *const f32, v: *const f32, ntp: usize) -> [__m512; 16] {
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut t = 0;
        while t < ntp {
            // SAFETY: the caller bounds all 8 rows.
            unsafe {
                let us = [
                    _mm512_loadu_ps(u.add(t)),
                    _mm512_loadu_ps(u.add(ntp + t)),
                    _mm512_loadu_ps(u.add(2 * ntp + t)),
                    _mm512_loadu_ps(u.add(3 * ntp + t)),
                ];
                for j in 0..4 {
                    let vj = _mm512_loadu_ps(v.add(j * ntp + t));
                    for (i, &ui) in us.iter().enumerate() {
                        acc[4 * i + j] = _mm512_fmadd_ps(ui, vj, acc[4 * i + j]);
                    }
                }
            }
            t += 16;
        }
        acc
    }

    /// Lane `l` of the result is the sum of the 16 lanes of `v[l]`: two rounds across 128-bit
    /// lanes, then two within them, each round halving the number of vectors.
    #[target_feature(enable = "avx512f")]
    pub(in crate::kernels) fn hsum16(v: [__m512; 16]) -> __m512 {
        // Round 1: v[j] and v[j+4] → 128-bit lanes (v[j].0+2, v[j].1+3, v[j+4].0+2, v[j+4].1+3);
        // likewise v[j+8] and v[j+12].
        let half = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        };
        // Round 2: 128-bit lane q of w[j] holds four partial sums of v[4q + j].
        let w: [__m512; 4] = std::array::from_fn(|j| {
            let (p, q) = (half(v[j], v[j + 4]), half(v[j + 8], v[j + 12]));
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(p, q),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q),
            )
        });
        // Rounds 3 and 4, within each 128-bit lane q: (w0, w1, w2, w3) → sums of v[4q..4q+4].
        let pair = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        };
        let (s01, s23) = (pair(w[0], w[1]), pair(w[2], w[3]));
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(s01, s23),
            _mm512_shuffle_ps::<0b11_01_11_01>(s01, s23),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::conv2d_backward_weight_gemm;
    use crate::kernels::test_util::{max_rel, rand_vec};

    #[test]
    fn hsum16_sums_each_vector_into_its_lane() {
        if isa::skip_without_avx512("hsum16_sums_each_vector_into_its_lane") {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let vals: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32).collect();
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above; 16 floats per load and store.
            unsafe {
                let v: [__m512; 16] =
                    std::array::from_fn(|l| _mm512_loadu_ps(vals[16 * l..].as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr(), avx512::hsum16(v));
            }
            for (l, &g) in got.iter().enumerate() {
                assert_eq!(
                    g,
                    vals[16 * l..16 * (l + 1)].iter().sum::<f32>(),
                    "lane {l}"
                );
            }
        }
    }

    /// Runs every case `(b, c, h, w, k)` through [`conv_backward_weight`] for each
    /// `(m, tolerance)`, in bf16 or f32, and returns the largest relative error against the
    /// GEMM path (each under its tolerance).
    fn check_against_gemm(
        cases: &[(usize, usize, usize, usize, usize)],
        tiles: &[(usize, f32)],
        bf16: bool,
    ) -> f32 {
        let mut worst = 0f32;
        for (i, &(b, c, h, w, k)) in cases.iter().enumerate() {
            let g = ConvGeom::new(b, c, h, w, k, 3, 3, 1, 1).unwrap();
            assert!(applicable(&g));
            let x = rand_vec(g.input_len(), 10 + i as u64);
            let dy = rand_vec(g.output_len(), 20 + i as u64);
            let want = conv2d_backward_weight_gemm(&g, &x, &dy);
            for &(m, tol) in tiles {
                let got = conv_backward_weight(&g, &x, &dy, m, bf16);
                let err = max_rel(&got, &want);
                eprintln!("F(3x3,{m}x{m}) {g:?} (bf16 {bf16}): max relative error {err:e}");
                assert!(err < tol, "F(3x3,{m}x{m}) {g:?}: max relative error {err}");
                worst = worst.max(err);
            }
        }
        worst
    }

    #[test]
    fn winograd_weight_gradient_matches_gemm_path() {
        if isa::skip_without_avx512("winograd_weight_gradient_matches_gemm_path") {
            return;
        }
        // (b, c, h, w, k): odd sizes (partial tiles), more than one chunk, a partial K block.
        let cases = [
            (1, 4, 5, 7, 4),
            (2, 8, 6, 6, 12),
            (3, 12, 9, 4, 68),
            (8, 4, 47, 48, 4),
            (2, 64, 12, 12, 128),
        ];
        // F(3x3, 4x4)'s transforms have larger coefficients (up to 8 and 1/24): a looser
        // bound, as for the forward F(4x4, 3x3).
        check_against_gemm(&cases, &[(2, 5e-6), (4, 5e-5)], false);
    }

    /// The bf16 GEMMs against the f32 reference (partial tiles, chunks whose tile count is not
    /// a multiple of 32, more than one chunk, a 64-image batch): within the stated bound, and
    /// not exact.
    #[test]
    fn winograd_weight_gradient_bf16_within_bf16_rounding() {
        if isa::skip_without_bf16("winograd_weight_gradient_bf16") {
            return;
        }
        let cases = [
            (1, 4, 5, 7, 4),
            (3, 12, 9, 4, 68),
            (8, 4, 47, 48, 4),
            (64, 64, 12, 12, 64),
        ];
        // F(2x2) only, as training runs it (`conv::bf16_pays`); measured max 5.5e-3.
        let worst = check_against_gemm(&cases, &[(2, 1e-2)], true);
        assert!(worst > 1e-5, "bf16: exact, so not bf16 ({worst})");
    }
}
