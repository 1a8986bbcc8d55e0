//! What Winograd's forward convolution ([`super::forward`]) and its weight gradient
//! ([`crate::kernels::wgrad`]) share: the weight-transform matrices `G`, the tiling of the
//! output into m x m tiles, the zero-padded input planes, the input transform `Bᵀ d B` (AVX-512,
//! 16 tiles per vector), and the per-thread scratch buffers and the parallel loop both run on.

use rayon::prelude::*;

use crate::kernels::geom::{ConvGeom, SharedOut};

/// `G` of F(2x2, 3x3): the weight transform (4x3).
pub(in crate::kernels) const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// `G` of F(4x4, 3x3) with interpolation points 0, ±1, ±2, ∞ (6x3).
pub(in crate::kernels) const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Floats from one ξ block `[channels][ntp]` of a transformed chunk (V, M, U) to the next: the
/// block plus one cache line. The blocks are multiples of 4 KiB, so without it the 16 or 36
/// rows of one channel, which a transform writes or reads together, would all fall into the
/// same L1 set.
pub(in crate::kernels) fn xi_stride(channels: usize, ntp: usize) -> usize {
    channels * ntp + 16
}

/// Tile geometry of one convolution.
pub(in crate::kernels) struct Tiles {
    /// Output tile size.
    pub(in crate::kernels) m: usize,
    tw: usize,
    /// Tiles per image.
    per_img: usize,
    pub(in crate::kernels) total: usize,
    /// Padded input row width and rows (m·tiles + 2).
    pub(in crate::kernels) wp: usize,
    pub(in crate::kernels) hp: usize,
}

impl Tiles {
    pub(in crate::kernels) fn new(g: &ConvGeom, m: usize) -> Self {
        let (th, tw) = (g.oh.div_ceil(m), g.ow.div_ceil(m));
        Self {
            m,
            tw,
            per_img: th * tw,
            total: g.b * th * tw,
            wp: m * tw + 2,
            hp: m * th + 2,
        }
    }

    /// Runs of up to 16 tiles of one tile row, covering tiles `t0..t1`: `(tile, n, ty, tx, len)`.
    pub(in crate::kernels) fn runs(&self, t0: usize, t1: usize) -> Runs<'_> {
        Runs {
            tl: self,
            t: t0,
            t1,
        }
    }
}

pub(in crate::kernels) struct Runs<'a> {
    tl: &'a Tiles,
    t: usize,
    t1: usize,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize, usize, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        if self.t >= self.t1 {
            return None;
        }
        let (tl, t) = (self.tl, self.t);
        let (n, r) = (t / tl.per_img, t % tl.per_img);
        let (ty, tx) = (r / tl.tw, r % tl.tw);
        let len = (tl.tw - tx).min(16).min(self.t1 - t);
        self.t += len;
        Some((t, n, ty, tx, len))
    }
}

/// Floats past the padded input that the last tile row's vector loads may read.
const SLACK: usize = 96;

/// Planes of `h x w` (`src` holds a whole number of them) copied into zero-padded planes of
/// `hp x wp` at row and column offset `pad`, followed by [`SLACK`] zeros for the last vector
/// loads. Plane by plane across the cores, each float written once.
pub(in crate::kernels) fn padded_planes(
    src: &[f32],
    (h, w): (usize, usize),
    (hp, wp): (usize, usize),
    pad: usize,
) -> Vec<f32> {
    assert!(h + pad <= hp && w + pad <= wp && src.len().is_multiple_of(h * w));
    let total = src.len() / (h * w) * hp * wp;
    let mut out = Vec::with_capacity(total + SLACK);
    let (body, slack) = out.spare_capacity_mut()[..total + SLACK].split_at_mut(total);
    let zero = std::mem::MaybeUninit::new(0.0);
    body.par_chunks_mut(hp * wp)
        .zip(src.par_chunks(h * w))
        .with_min_len(8)
        .for_each(|(dst, plane)| {
            for (i, drow) in dst.chunks_mut(wp).enumerate() {
                match i.checked_sub(pad).filter(|&y| y < h) {
                    Some(y) => {
                        let (left, rest) = drow.split_at_mut(pad);
                        let (mid, right) = rest.split_at_mut(w);
                        left.fill(zero);
                        for (d, &v) in mid.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                            d.write(v);
                        }
                        right.fill(zero);
                    }
                    None => drow.fill(zero),
                }
            }
        });
    slack.fill(zero);
    // SAFETY: every one of the first total + SLACK floats was written above.
    unsafe { out.set_len(total + SLACK) };
    out
}

/// A per-thread buffer that is reused across calls instead of being allocated and cleared each
/// time (the block buffers are bounded by the block size). Popped from the thread's pool while in
/// use, so a nested call (a rayon worker that runs another convolution while it waits) gets a
/// different one.
pub(in crate::kernels) struct Scratch {
    pub(in crate::kernels) buf: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A buffer of at least `len` initialised floats (of unspecified value).
    ///
    /// Takes the smallest pooled buffer that is large enough, else the largest, which is then
    /// replaced by a fresh one of `len` floats (not grown: growing copies the old contents).
    pub(in crate::kernels) fn take(len: usize) -> Self {
        let buf = SCRATCH.with(|s| {
            let mut pool = s.borrow_mut();
            let fits = (0..pool.len())
                .filter(|&i| pool[i].len() >= len)
                .min_by_key(|&i| pool[i].len());
            let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        });
        if buf.len() < len {
            return Self {
                buf: vec![0.0; len],
            };
        }
        Self { buf }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        SCRATCH.with(|s| s.borrow_mut().push(buf));
    }
}

/// `f(i)` for `i < n`, split across the cores when `par`.
pub(in crate::kernels) fn for_each(n: usize, par: bool, f: impl Fn(usize) + Sync + Send) {
    if par && n > 1 {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// The input transforms (AVX-512).
#[cfg(target_arch = "x86_64")]
pub(in crate::kernels) mod avx512 {
    use std::arch::x86_64::*;

    use super::{xi_stride, SharedOut, Tiles};

    pub(in crate::kernels) const EVEN: [i32; 16] =
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    pub(in crate::kernels) const ODD: [i32; 16] =
        [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    #[target_feature(enable = "avx512f")]
    pub(in crate::kernels) fn idx(v: &[i32; 16]) -> __m512i {
        // SAFETY: 16 i32 are 64 bytes.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

    /// `V_ξ[c][t − t0]` for input channel `c` and tiles `t0..t1`.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `c` of `v`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) unsafe fn input2(
        tl: &Tiles,
        xp: &[f32],
        channels: usize,
        c: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
        v: SharedOut,
    ) {
        let (even, odd) = (idx(&EVEN), idx(&ODD));
        let plane = tl.hp * tl.wp;
        assert!(16 * xi_stride(channels, ntp) <= v.len());
        for (t, n, ty, tx, len) in tl.runs(t0, t1) {
            let base = (n * channels + c) * plane + 2 * ty * tl.wp + 2 * tx;
            // The farthest read: 3 rows down, 2 + 32 floats across (slack covers the overrun).
            assert!(base + 3 * tl.wp + 34 <= xp.len());
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for (i, row) in d.iter_mut().enumerate() {
                // SAFETY: asserted above.
                let (a, b, a2, b2) = unsafe {
                    let r = xp.as_ptr().add(base + i * tl.wp);
                    (
                        _mm512_loadu_ps(r),
                        _mm512_loadu_ps(r.add(16)),
                        _mm512_loadu_ps(r.add(2)),
                        _mm512_loadu_ps(r.add(18)),
                    )
                };
                row[0] = _mm512_permutex2var_ps(a, even, b);
                row[1] = _mm512_permutex2var_ps(a, odd, b);
                row[2] = _mm512_permutex2var_ps(a2, even, b2);
                row[3] = _mm512_permutex2var_ps(a2, odd, b2);
            }
            // Bᵀ d B with Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
            let mut tmp = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..4 {
                tmp[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                tmp[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                tmp[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                tmp[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
            }
            let mask: __mmask16 = ((1u32 << len) - 1) as u16;
            for (i, r) in tmp.iter().enumerate() {
                let vals = [
                    _mm512_sub_ps(r[0], r[2]),
                    _mm512_add_ps(r[1], r[2]),
                    _mm512_sub_ps(r[2], r[1]),
                    _mm512_sub_ps(r[1], r[3]),
                ];
                for (j, val) in vals.into_iter().enumerate() {
                    let dst = (i * 4 + j) * xi_stride(channels, ntp) + c * ntp + (t - t0);
                    // SAFETY: dst + len <= 16·xi_stride(channels, ntp) (asserted), lanes
                    // past len masked.
                    unsafe { _mm512_mask_storeu_ps(v.ptr().add(dst), mask, val) };
                }
            }
        }
    }

    /// `[j, 4+j, …, 28+j]` twice: lanes 0-7 pick from the first pair of vectors, 8-15 from the
    /// second, giving floats `4t + j` of 64 consecutive ones.
    const fn stride4(j: i32) -> [i32; 16] {
        let mut v = [0; 16];
        let mut t = 0;
        while t < 16 {
            v[t] = 4 * (t as i32 % 8) + j;
            t += 1;
        }
        v
    }
    pub(in crate::kernels) const STRIDE4: [[i32; 16]; 4] =
        [stride4(0), stride4(1), stride4(2), stride4(3)];

    /// `Bᵀ d B` along one axis for F(4x4,3x3):
    /// `Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn bt6(d: [__m512; 6]) -> [__m512; 6] {
        let (four, five, two) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(5.0),
            _mm512_set1_ps(2.0),
        );
        // t0 = 4d0 − 5d2 + d4
        let t0 = _mm512_fnmadd_ps(five, d[2], _mm512_fmadd_ps(four, d[0], d[4]));
        // t1 = −4(d1 + d2) + d3 + d4 ; t2 = 4(d1 − d2) − d3 + d4
        let t1 = _mm512_fnmadd_ps(four, _mm512_add_ps(d[1], d[2]), _mm512_add_ps(d[3], d[4]));
        let t2 = _mm512_fmadd_ps(four, _mm512_sub_ps(d[1], d[2]), _mm512_sub_ps(d[4], d[3]));
        // t3 = 2(d3 − d1) + d4 − d2 ; t4 = 2(d1 − d3) + d4 − d2
        let t3 = _mm512_fmadd_ps(two, _mm512_sub_ps(d[3], d[1]), _mm512_sub_ps(d[4], d[2]));
        let t4 = _mm512_fmadd_ps(two, _mm512_sub_ps(d[1], d[3]), _mm512_sub_ps(d[4], d[2]));
        // t5 = 4d1 − 5d3 + d5
        let t5 = _mm512_fnmadd_ps(five, d[3], _mm512_fmadd_ps(four, d[1], d[5]));
        [t0, t1, t2, t3, t4, t5]
    }

    /// [`input2`] for F(4x4,3x3): 6x6 input tiles at stride 4, 36 positions ξ.
    ///
    /// # Safety
    /// AVX-512F; no other thread writes channel `c` of `v`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) unsafe fn input4(
        tl: &Tiles,
        xp: &[f32],
        channels: usize,
        c: usize,
        t0: usize,
        t1: usize,
        ntp: usize,
        v: SharedOut,
    ) {
        let sel = [
            idx(&STRIDE4[0]),
            idx(&STRIDE4[1]),
            idx(&STRIDE4[2]),
            idx(&STRIDE4[3]),
        ];
        let plane = tl.hp * tl.wp;
        assert!(36 * xi_stride(channels, ntp) <= v.len());
        for (t, n, ty, tx, len) in tl.runs(t0, t1) {
            let base = (n * channels + c) * plane + 4 * ty * tl.wp + 4 * tx;
            // The farthest read: 5 rows down, 4 + 64 floats across (slack covers the overrun).
            assert!(base + 5 * tl.wp + 68 <= xp.len());
            let mut d = [[_mm512_setzero_ps(); 6]; 6];
            for (i, row) in d.iter_mut().enumerate() {
                // SAFETY: asserted above.
                let r = unsafe { xp.as_ptr().add(base + i * tl.wp) };
                // SAFETY: asserted above (r + 64 floats, and r[64], r[65], are in bounds).
                let (q, next) = unsafe {
                    (
                        [
                            _mm512_loadu_ps(r),
                            _mm512_loadu_ps(r.add(16)),
                            _mm512_loadu_ps(r.add(32)),
                            _mm512_loadu_ps(r.add(48)),
                        ],
                        [*r.add(64), *r.add(65)],
                    )
                };
                for (j, s) in sel.iter().enumerate() {
                    let lo = _mm512_permutex2var_ps(q[0], *s, q[1]);
                    let hi = _mm512_permutex2var_ps(q[2], *s, q[3]);
                    row[j] = _mm512_mask_blend_ps(0xff00, lo, hi);
                }
                // Columns 4 and 5 of tile t are columns 0 and 1 of tile t + 1: shift those down
                // one lane and take tile 16's from the row (floats 64 and 65).
                for j in 0..2 {
                    let shifted = _mm512_alignr_epi32::<1>(
                        _mm512_castps_si512(_mm512_set1_ps(next[j])),
                        _mm512_castps_si512(row[j]),
                    );
                    row[4 + j] = _mm512_castsi512_ps(shifted);
                }
            }
            // Bᵀ d B: columns of each row, then rows of the result.
            let mut rows = [[_mm512_setzero_ps(); 6]; 6];
            for (r, di) in rows.iter_mut().zip(d) {
                *r = bt6(di);
            }
            let mask: __mmask16 = ((1u32 << len) - 1) as u16;
            // Column j of the row-transformed tile, transformed again.
            #[allow(clippy::needless_range_loop)]
            for j in 0..6 {
                let col = bt6([
                    rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j],
                ]);
                for (i, val) in col.into_iter().enumerate() {
                    let dst = (i * 6 + j) * xi_stride(channels, ntp) + c * ntp + (t - t0);
                    // SAFETY: dst + len <= 36·xi_stride(channels, ntp) (asserted), lanes
                    // past len masked.
                    unsafe { _mm512_mask_storeu_ps(v.ptr().add(dst), mask, val) };
                }
            }
        }
    }
}
