//! Shapes only, the ground floor every kernel stands on: the geometry of a convolution, a
//! max-pool and a feature map, and the output buffer that parallel workers share.

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// Checks the sizes and derives the output size; `None` if the kernel does not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw || kh == 0 || kw == 0 {
            return None;
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Some(Self {
            b,
            c,
            h,
            w,
            k,
            kh,
            kw,
            stride,
            pad,
            oh,
            ow,
        })
    }

    /// Rows of the column matrix (C·KH·KW).
    pub fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image.
    pub fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output columns per im2col tile: about 128K floats of column matrix (512 KiB), which keeps
    /// the tile and the packed GEMM operands in L2, rounded to a multiple of 64 (the column count
    /// of gemm's widest AVX-512 micro-kernel, since it computes the transposed product).
    pub(crate) fn tile(&self) -> usize {
        let t = (128 * 1024 / self.ckk().max(1)).max(64) / 64 * 64;
        if t >= self.ohw() {
            self.ohw().max(1)
        } else {
            t
        }
    }

    pub fn input_len(&self) -> usize {
        self.b * self.c * self.h * self.w
    }

    pub fn weight_len(&self) -> usize {
        self.k * self.ckk()
    }

    pub fn output_len(&self) -> usize {
        self.b * self.k * self.ohw()
    }
}

/// Geometry of a max-pool over `(b·c)` planes of `h×w`; padding counts as −∞.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeom {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn new(
        planes: usize,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if kernel == 0
            || stride == 0
            || pad >= kernel
            || h + 2 * pad < kernel
            || w + 2 * pad < kernel
        {
            return None;
        }
        Some(Self {
            planes,
            h,
            w,
            kernel,
            stride,
            pad,
            oh: (h + 2 * pad - kernel) / stride + 1,
            ow: (w + 2 * pad - kernel) / stride + 1,
        })
    }

    /// Input rows (or columns) `0..len` that the window of output row (column) `o` covers.
    /// Never empty: the padding is smaller than the kernel, and the last window starts inside.
    pub(crate) fn window(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride).saturating_sub(self.pad);
        start..(o * self.stride + self.kernel - self.pad).min(len)
    }

    /// Index (within the plane) of the first maximum of the window of output `(oy, ox)`; the
    /// first NaN wins, so that it propagates.
    pub(crate) fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        let (ys, xs) = (self.window(oy, self.h), self.window(ox, self.w));
        let mut best = ys.start * self.w + xs.start;
        let mut best_v = plane[best];
        for iy in ys {
            let row = iy * self.w;
            for (ix, &v) in plane[row + xs.start..row + xs.end].iter().enumerate() {
                if v > best_v || (v.is_nan() && !best_v.is_nan()) {
                    best = row + xs.start + ix;
                    best_v = v;
                }
            }
        }
        best
    }
}

/// Shape of a `(b, c, h, w)` feature map as the batch-norm and CBAM kernels see it: `hw` values
/// per channel per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapGeom {
    pub b: usize,
    pub c: usize,
    pub hw: usize,
}

impl MapGeom {
    pub fn len(&self) -> usize {
        self.b * self.c * self.hw
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per channel over the batch.
    pub fn n(&self) -> usize {
        self.b * self.hw
    }

    /// The `b` planes of channel `c` of `x`.
    pub fn planes<'a>(&self, x: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (cs, hw) = (self.c * self.hw, self.hw);
        (0..self.b).map(move |n| &x[n * cs + c * hw..][..hw])
    }
}

/// The output buffer, shared by parallel workers that each write a disjoint block of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: workers only write disjoint (row-range × column-range) blocks of one image each, as
// laid out by `conv2d_forward`; the buffer outlives the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }
    // Accessors make closures capture the whole (Sync) struct, not its raw-pointer field.
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.ptr
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}
