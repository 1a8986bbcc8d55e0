//! Direct convolution with AVX-512 or AVX2 micro-kernels and weights packed once.
//!
//! The convolution is an implicit GEMM, `out (K, positions) = W (K, C·KH·KW) × X`, where no column
//! matrix is ever built: the input is laid out so that every row of X is a plain shift of one
//! plane.
//!
//! - The zero-padded input is split into `stride²` phase planes (for stride 1, the padded image
//!   itself): phase `(a, b)` holds padded pixels `(i·s + a, j·s + b)`, `PW = ⌈(W+2p)/s⌉` wide.
//! - Outputs are computed on a grid `OH × PW` (the columns `≥ OW` are junk and never stored), so
//!   output `(oy, ox)` at grid position `q = oy·PW + ox` reads kernel tap `(ky, kx)` of channel `c`
//!   at `q + (ky/s)·PW + kx/s` of phase `(ky mod s, kx mod s)` of channel `c`: one offset per row of X.
//! - Weights are packed into panels of [`MR`] output channels, `[C·KH·KW][MR]` each, once per
//!   weight tensor (the inference path caches them; training packs per call).
//! - The AVX-512 micro-kernel keeps a 16-channel × 16-position tile in 16 registers and, per tap,
//!   loads one vector of 16 positions and broadcasts 16 weights from memory: 16 FMAs per vector
//!   load; the AVX2 one keeps 16 channels × 6 positions, loads the weights and broadcasts the
//!   inputs ([`avx2`]). Bias and ReLU are applied when the tile is stored.
//!
//! Runs where the CPU has AVX-512F, or AVX2 with FMA and F16C ([`super::isa`]); which layers
//! it takes is decided in [`super::conv`]. The AVX-512 micro-tiles it shares with Winograd are
//! in [`super::microkernel`]; the drivers that run them over a layer, for each instruction set,
//! in [`avx512`] and [`avx2`] (which keeps its own narrower tiles); the plans, layouts and work
//! split here are shared by both.

use rayon::prelude::*;

use super::geom::{ConvGeom, SharedOut};
use super::isa::{self, Isa};
use super::microkernel::{panel_pair, FewTap, ALL_SLOTS, FEW_POS, MR};

/// Output positions per micro-tile of the AVX-512 grid kernel (one 512-bit vector of f32).
const NR: usize = 16;
/// Output positions per micro-tile of the AVX2 grid kernel: 6 positions × 16 channels (two
/// 256-bit vectors) are 12 sums, which with the two weight vectors and a broadcast fill 15 of
/// the 16 registers.
const NR_AVX2: usize = 6;

/// Convolution weights `(K, C, KH, KW)` packed into panels of [`MR`] output channels.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    pub k: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    data: Panels,
}

/// The packed panels' numbers: f32, or IEEE half precision for the few-positions kernel.
#[derive(Debug, Clone)]
enum Panels {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl PackedWeights {
    /// Packs row-major `(k, c, kh, kw)` weights; channels past `k` in the last panel are zero.
    pub fn pack(w: &[f32], k: usize, c: usize, kh: usize, kw: usize) -> Self {
        let kd = c * kh * kw;
        assert_eq!(w.len(), k * kd, "pack: weight length");
        Self::pack_with(k, c, kh, kw, |o, j| w[o * kd + j])
    }

    /// [`pack`](Self::pack), rounded to IEEE half precision (for the few-positions kernel),
    /// or `None` where some weight is beyond half's range (|w| > 65504) or not finite.
    pub fn pack_half(w: &[f32], k: usize, c: usize, kh: usize, kw: usize) -> Option<Self> {
        if !w.iter().all(|v| v.abs() <= f32::from(half::f16::MAX)) {
            return None;
        }
        let pw = Self::pack(w, k, c, kh, kw);
        let data = Panels::F16(
            pw.f32_panels()
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect(),
        );
        Some(Self { data, ..pw })
    }

    /// The f32 panels; panics for half-precision ones (only the few-positions kernel takes
    /// those).
    fn f32_panels(&self) -> &[f32] {
        match &self.data {
            Panels::F32(d) => d,
            Panels::F16(_) => {
                panic!("direct conv: half-precision weights outside the few-positions kernel")
            }
        }
    }

    fn pack_with(
        k: usize,
        c: usize,
        kh: usize,
        kw: usize,
        at: impl Fn(usize, usize) -> f32,
    ) -> Self {
        let kd = c * kh * kw;
        let mut data = vec![0f32; k.div_ceil(MR) * kd * MR];
        for o in 0..k {
            let (panel, r) = (o / MR, o % MR);
            let base = panel * kd * MR + r;
            for j in 0..kd {
                data[base + j * MR] = at(o, j);
            }
        }
        Self {
            k,
            c,
            kh,
            kw,
            data: Panels::F32(data),
        }
    }

    fn panels(&self) -> usize {
        self.k.div_ceil(MR)
    }

    fn kd(&self) -> usize {
        self.c * self.kh * self.kw
    }
}

/// The phase-plane layout of one convolution's input.
struct Layout {
    /// Phases in use along y and x: `min(stride, kernel)` (a 1x1 stride-2 kernel reads one).
    sa: usize,
    sb: usize,
    /// Phase grid width and height.
    pw: usize,
    ph: usize,
    /// Floats per phase plane (the grid plus zero slack that the last tile may read).
    plane: usize,
    /// Output positions per micro-tile (at most [`NR`]).
    nr: usize,
    /// Micro-tiles per image.
    tiles: usize,
}

impl Layout {
    fn new(g: &ConvGeom, nr: usize) -> Self {
        assert!((1..=NR).contains(&nr), "direct conv: tile width {nr}");
        let s = g.stride;
        let pw = (g.w + 2 * g.pad).div_ceil(s);
        let ph = (g.h + 2 * g.pad).div_ceil(s);
        let tiles = (g.oh * pw).div_ceil(nr);
        let max_off = (g.kh - 1) / s * pw + (g.kw - 1) / s;
        let plane = (tiles * nr + max_off).max(ph * pw);
        Self {
            nr,
            sa: s.min(g.kh),
            sb: s.min(g.kw),
            pw,
            ph,
            plane,
            tiles,
        }
    }

    fn image_len(&self, g: &ConvGeom) -> usize {
        g.c * self.channel_len()
    }

    /// Floats per channel of one image's phase planes.
    fn channel_len(&self) -> usize {
        self.sa * self.sb * self.plane
    }

    /// Offset of kernel tap `(ky, kx)` of channel 0 inside one image's phase planes.
    fn tap_offset(&self, g: &ConvGeom, ky: usize, kx: usize) -> usize {
        let s = g.stride;
        ((ky % s) * self.sb + kx % s) * self.plane + ky / s * self.pw + kx / s
    }

    /// Offset of every row of X (channel, tap) inside one image's phase planes.
    fn offsets(&self, g: &ConvGeom) -> Vec<u32> {
        let mut off = Vec::with_capacity(g.ckk());
        for c in 0..g.c {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let o = c * self.channel_len() + self.tap_offset(g, ky, kx);
                    off.push(u32::try_from(o).expect("conv input too large for u32 offsets"));
                }
            }
        }
        off
    }

    /// Splits one channel `(h, w)` into its zero-padded phase planes (`planes`, zeroed).
    fn fill(&self, g: &ConvGeom, src: &[f32], planes: &mut [f32]) {
        let s = g.stride;
        for a in 0..self.sa {
            for b in 0..self.sb {
                let plane = &mut planes[(a * self.sb + b) * self.plane..][..self.plane];
                // Phase columns j with 0 <= j·s + b − pad < w.
                let j0 = g.pad.saturating_sub(b).div_ceil(s);
                let j1 = (g.w + g.pad).saturating_sub(b).div_ceil(s).min(self.pw);
                for i in 0..self.ph {
                    let Some(y) = (i * s + a).checked_sub(g.pad).filter(|&y| y < g.h) else {
                        continue;
                    };
                    let row = &src[y * g.w..(y + 1) * g.w];
                    let dst = &mut plane[i * self.pw..(i + 1) * self.pw];
                    if s == 1 {
                        if j1 > j0 {
                            dst[j0..j1].copy_from_slice(&row[j0 - g.pad..j1 - g.pad]);
                        }
                    } else {
                        for j in j0..j1 {
                            dst[j] = row[j * s + b - g.pad];
                        }
                    }
                }
            }
        }
    }
}

/// `relu?(conv(x, w) + bias)` for `x (b, c, h, w)` → `(b, k, oh, ow)`.
///
/// Panics if [`isa`] is `None` or the sizes disagree; callers check both.
pub fn conv_forward(
    g: &ConvGeom,
    x: &[f32],
    pw: &PackedWeights,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let isa = isa::direct().expect("direct conv without AVX-512 or AVX2");
    conv_forward_with(isa, g, x, pw, bias, relu)
}

/// [`conv_forward`] with the kernels of `isa` (the tests run every one this CPU has).
fn conv_forward_with(
    isa: Isa,
    g: &ConvGeom,
    x: &[f32],
    pw: &PackedWeights,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    assert!(
        isa.supported(),
        "direct conv: {isa:?} is not available here"
    );
    assert_eq!((pw.k, pw.c, pw.kh, pw.kw), (g.k, g.c, g.kh, g.kw));
    assert_eq!(x.len(), g.input_len());
    assert!(bias.is_none_or(|b| b.len() == g.k));
    let mut y = vec![0f32; g.output_len()];
    let out = SharedOut::new(&mut y);
    let panels = pw.panels();
    if few_positions(g) {
        // Few output positions per image (the last stages): vectorise over output channels
        // instead, so no lane is spent on padding columns, and fill each micro-tile with the
        // positions of consecutive images, so tiny maps fill it too. The input is read where it
        // lies: the plan skips every tap that would read padding. An item is a pair of weight
        // panels over a chunk of images that fits in L2 (all of a small batch); items are
        // chunk-major, so a worker's consecutive items share the chunk while the panels stream.
        let img_len = g.c * g.h * g.w;
        let per_chunk = ((512 << 10) / (4 * img_len).max(1)).clamp(1, g.b);
        let chunks = g.b.div_ceil(per_chunk);
        let full = FewPlan::new(g, per_chunk);
        let last = g.b - (chunks - 1) * per_chunk;
        let tail = (last != per_chunk).then(|| FewPlan::new(g, last));
        // Two panels at a time: the tap bookkeeping and each input value's broadcast then serve
        // 32 output channels instead of 16 (batch 1, 256 and 512 channels of 3x3 and 2x2 maps,
        // weights in cache: 24-28% less time with f32 weights, 39% with half ones).
        let pairs = panels.div_ceil(2);
        (0..chunks * pairs).into_par_iter().for_each(|item| {
            let ch = item / pairs;
            let (p, np) = panel_pair(panels, item % pairs);
            let plan = if ch + 1 == chunks {
                tail.as_ref().unwrap_or(&full)
            } else {
                &full
            };
            let n0 = ch * per_chunk;
            let x = &x[n0 * img_len..(n0 + plan.images) * img_len];
            // SAFETY: the instruction set is present (`isa`); the item writes only the output
            // channels of panels p..p + np of images n0.., which no other item touches.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let pn = (p, np);
                match (&pw.data, isa) {
                    (Panels::F32(a), Isa::Avx512) => {
                        avx512::run_few(g, pw, a, plan, x, bias, relu, pn, n0, out)
                    }
                    (Panels::F16(a), Isa::Avx512) => {
                        avx512::run_few(g, pw, a, plan, x, bias, relu, pn, n0, out)
                    }
                    (Panels::F32(a), Isa::Avx2) => {
                        avx2::run_few(g, pw, a, plan, x, bias, relu, pn, n0, out)
                    }
                    (Panels::F16(a), Isa::Avx2) => {
                        avx2::run_few(g, pw, a, plan, x, bias, relu, pn, n0, out)
                    }
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (p, x, out, isa);
        });
        return y;
    }
    let lay = Layout::new(
        g,
        match isa {
            Isa::Avx512 => NR,
            Isa::Avx2 => NR_AVX2,
        },
    );
    let img_len = lay.image_len(g);
    let mut xp = vec![0f32; g.b * img_len];
    // Channel by channel, so that batch 1 is split across the cores too.
    xp.par_chunks_mut(lay.channel_len())
        .zip(x.par_chunks(g.h * g.w))
        .with_min_len(8)
        .for_each(|(dst, src)| lay.fill(g, src, dst));
    // Enough items for every core even at batch 1, each a run of tiles sharing one weight panel.
    let want = 8 * rayon::current_num_threads().max(1);
    let chunks = want.div_ceil(g.b * panels).clamp(1, lay.tiles);
    let off = &lay.offsets(g);
    let per = lay.tiles.div_ceil(chunks);
    let items = g.b * panels * chunks;
    let run = |item: usize| {
        let n = item / (panels * chunks);
        let p = (item / chunks) % panels;
        let ch = item % chunks;
        let (t0, t1) = (ch * per, ((ch + 1) * per).min(lay.tiles));
        if t0 >= t1 {
            return;
        }
        let job = Job {
            g,
            lay: &lay,
            kd: pw.kd(),
            a: &pw.f32_panels()[p * pw.kd() * MR..(p + 1) * pw.kd() * MR],
            x: &xp[n * img_len..(n + 1) * img_len],
            off,
            store: PanelStore::new(g, p, bias, relu),
            k0: p * MR,
            out_base: n * g.k * g.oh * g.ow,
        };
        // SAFETY: the instruction set is present (`isa`); the job writes only output rows
        // k0..k0+rows of image n at positions of tiles t0..t1, which no other item touches.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match isa {
                Isa::Avx512 => avx512::run_tiles(&job, t0, t1, out),
                Isa::Avx2 => avx2::run_tiles(&job, t0, t1, out),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (job, out, t0, t1);
    };
    if items == 1 {
        run(0);
    } else {
        (0..items).into_par_iter().for_each(run);
    }
    y
}

/// Whether the few-positions kernel runs: at most 48 outputs per image (6x6 and smaller maps),
/// where the grid kernel's 16-position tiles spend a quarter or more of their lanes on padding
/// columns and partial tiles, and kernels of at most 64 taps (one bit each in a tap mask).
pub fn few_positions(g: &ConvGeom) -> bool {
    g.oh * g.ow <= 48 && g.kh * g.kw <= 64
}

/// One micro-tile of the few-positions kernel: positions `start..start + len` of the plan's
/// order, over the taps of `taps[set]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FewTile {
    start: usize,
    len: usize,
    set: usize,
    /// Whether some taps of the set skip some of the tile's slots (a mixed tile).
    masked: bool,
}

/// The few-positions kernel's schedule for a chunk of `images` images, shared by every weight
/// panel. On these small maps many taps of a border output read only padding (at 2x2 with a 3x3
/// kernel, 5 of 9 taps for every output), so positions are grouped by the set of taps that read
/// the image, and each micro-tile multiplies only those: exact, since the skipped products are
/// zeros. Groups too small to fill a 4-wide tile share tiles over the union of their taps, each
/// tap masked to the slots whose positions read the image through it. As no padding is read,
/// the kernel reads the input `(images, c, h, w)` where it lies.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FewPlan {
    images: usize,
    /// Offset in the chunk's input of each position's top-left input pixel `(oy·s, ox·s)`
    /// (channel 0), in tile order.
    src: Vec<usize>,
    /// Output offset (channel 0, relative to the chunk's first image) of each position.
    dst: Vec<usize>,
    tiles: Vec<FewTile>,
    /// Tap sets: `(tap index ky·KW + kx, offset (ky − pad)·w + kx − pad from a position's
    /// `src`, the tile slots that read through the tap as a bit mask)`.
    taps: Vec<Vec<FewTap>>,
    /// The least and greatest channel-0 input offsets that the tiles read.
    reach: (isize, isize),
}

impl FewPlan {
    fn new(g: &ConvGeom, images: usize) -> Self {
        let kk = g.kh * g.kw;
        assert!(kk <= 64, "few-positions plan: more than 64 kernel taps");
        let plane = g.oh * g.ow;
        let valid = |o: usize, k: usize, len: usize| {
            (o * g.stride + k)
                .checked_sub(g.pad)
                .is_some_and(|i| i < len)
        };
        // Taps that read the image, as a bit mask.
        let mask = |oy: usize, ox: usize| -> u64 {
            (0..kk)
                .filter(|&t| valid(oy, t / g.kw, g.h) && valid(ox, t % g.kw, g.w))
                .fold(0, |m, t| m | 1 << t)
        };
        // Positions by tap set (in a fixed order), each set's positions image by image.
        let mut groups: Vec<(u64, Vec<(usize, usize)>)> = Vec::new();
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let m = mask(oy, ox);
                let at = match groups.iter().position(|(gm, _)| *gm == m) {
                    Some(i) => i,
                    None => {
                        groups.push((m, Vec::new()));
                        groups.len() - 1
                    }
                };
                groups[at].1.push((oy, ox));
            }
        }
        let mut plan = Self {
            images,
            src: Vec::with_capacity(images * plane),
            dst: Vec::with_capacity(images * plane),
            tiles: Vec::new(),
            taps: Vec::new(),
            reach: (isize::MAX, isize::MIN),
        };
        let has = |m: u64, t: usize| m >> t & 1 == 1;
        let (w, pad) = (g.w as isize, g.pad as isize);
        let offset = |t: usize| ((t / g.kw) as isize - pad) * w + (t % g.kw) as isize - pad;
        let img_len = g.c * g.h * g.w;
        let push = |plan: &mut Self, pos: &[(usize, usize)]| {
            for n in 0..images {
                for &(oy, ox) in pos {
                    plan.src.push(n * img_len + (oy * g.w + ox) * g.stride);
                    plan.dst.push(n * g.k * plane + oy * g.ow + ox);
                }
            }
        };
        // Positions of the groups too small for a tile of their own, and their tap masks.
        let (mut mixed, mut mixed_masks) = (Vec::new(), Vec::new());
        for (m, pos) in &groups {
            if images * pos.len() < 4 {
                mixed.extend_from_slice(pos);
                mixed_masks.extend(pos.iter().map(|_| *m));
                continue;
            }
            let taps = (0..kk)
                .filter(|&t| has(*m, t))
                .map(|t| (t, offset(t), ALL_SLOTS))
                .collect();
            let set = plan.intern(taps);
            let mut start = plan.src.len();
            push(&mut plan, pos);
            while start < plan.src.len() {
                let len = FEW_POS.min(plan.src.len() - start);
                plan.add_tile(start, len, set, false);
                start += len;
            }
        }
        if !mixed.is_empty() {
            // Each tile over the union of its positions' taps, a tap masked to the slots
            // whose positions read through it.
            let start = plan.src.len();
            push(&mut plan, &mixed);
            let masks: Vec<u64> = (0..images)
                .flat_map(|_| mixed_masks.iter().copied())
                .collect();
            for (i, chunk) in masks.chunks(FEW_POS).enumerate() {
                let union = chunk.iter().fold(0, |u, m| u | m);
                let taps = (0..kk)
                    .filter(|&t| has(union, t))
                    .map(|t| {
                        let slots = (0..chunk.len())
                            .filter(|&j| has(chunk[j], t))
                            .fold(0u16, |s, j| s | 1 << j);
                        (t, offset(t), slots)
                    })
                    .collect();
                let set = plan.intern(taps);
                plan.add_tile(start + i * FEW_POS, chunk.len(), set, true);
            }
        }
        plan
    }

    /// The index of tap set `taps`, added if new.
    fn intern(&mut self, taps: Vec<FewTap>) -> usize {
        match self.taps.iter().position(|s| *s == taps) {
            Some(i) => i,
            None => {
                self.taps.push(taps);
                self.taps.len() - 1
            }
        }
    }

    /// Adds a tile of positions `start..start + len` over tap set `set`, widening `reach` by
    /// every input offset it reads (an unmasked tap reads every slot).
    fn add_tile(&mut self, start: usize, len: usize, set: usize, masked: bool) {
        for &(_, off, slots) in &self.taps[set] {
            for (j, &q) in self.src[start..start + len].iter().enumerate() {
                if !masked || slots >> j & 1 == 1 {
                    let at = q as isize + off;
                    self.reach = (self.reach.0.min(at), self.reach.1.max(at));
                }
            }
        }
        self.tiles.push(FewTile {
            start,
            len,
            set,
            masked,
        });
    }

    /// The few-positions kernels' bounds, checked once per item: every read of the plan is
    /// inside `x` (images `n0..` of the batch), every write inside `out`, every tap inside a
    /// panel, and panels `p0..p0 + np` (1 or 2) exist.
    fn check(&self, g: &ConvGeom, x: &[f32], out: SharedOut, n0: usize, (p0, np): (usize, usize)) {
        assert!((1..=2).contains(&np) && (p0 + np) * MR < g.k + MR);
        let plane = g.oh * g.ow;
        let cl = g.h * g.w;
        // (A plan may read nothing: with no channels, or padding wider than the kernel.)
        let reads = g.c > 0 && self.reach.0 <= self.reach.1;
        assert!(
            !reads || (self.reach.0 >= 0 && (self.reach.1 as usize) + (g.c - 1) * cl < x.len())
        );
        assert!(self.taps.iter().flatten().all(|t| t.0 < g.kh * g.kw));
        assert!(n0 + self.images <= g.b && g.b * g.k * plane <= out.len());
        assert!(self.dst.iter().all(|&d| d < self.images * g.k * plane));
    }
}

/// How one weight panel's sums become outputs: the panel's bias (if any) added, then ReLU.
pub(super) struct PanelStore<'a> {
    rows: usize,
    bias: Option<&'a [f32]>,
    relu: bool,
}

impl<'a> PanelStore<'a> {
    /// For panel `p` of a `g.k`-channel layer with bias `bias` (all `g.k` channels).
    fn new(g: &ConvGeom, p: usize, bias: Option<&'a [f32]>, relu: bool) -> Self {
        let rows = MR.min(g.k - p * MR);
        Self {
            rows,
            bias: bias.map(|b| &b[p * MR..p * MR + rows]),
            relu,
        }
    }

    /// Writes one output position's sums `lanes` (one per channel of the panel): the panel's
    /// channel `r` goes to `out[base + r·stride]`.
    ///
    /// # Safety
    /// Those places must be inside `out`, and no other thread may write them.
    #[inline(always)]
    unsafe fn put(&self, lanes: &[f32; MR], out: SharedOut, base: usize, stride: usize) {
        for (r, val) in lanes.iter().enumerate().take(self.rows) {
            let y = val + self.bias.map_or(0.0, |b| b[r]);
            let y = if self.relu { y.max(0.0) } else { y };
            // SAFETY: the caller's contract.
            unsafe { *out.ptr().add(base + r * stride) = y };
        }
    }
}

/// One work item's operands.
struct Job<'a> {
    g: &'a ConvGeom,
    lay: &'a Layout,
    kd: usize,
    /// The weight panel `[kd][MR]`.
    a: &'a [f32],
    /// One image's phase planes.
    x: &'a [f32],
    off: &'a [u32],
    /// The panel's output channels from `k0`, their bias and ReLU.
    store: PanelStore<'a>,
    k0: usize,
    out_base: usize,
}

impl Job<'_> {
    /// The runs of a tile's lanes that land on valid outputs, `(first lane, lanes, output offset
    /// within a channel plane)`, and how many there are.
    fn segments(&self, tile: usize) -> ([(usize, usize, usize); NR], usize) {
        let (g, pw) = (self.g, self.lay.pw);
        let nr = self.lay.nr;
        let mut segs = [(0, 0, 0); NR];
        let mut n = 0;
        let mut lane = 0;
        while lane < nr {
            let q = tile * nr + lane;
            let (oy, ox) = (q / pw, q % pw);
            if oy >= g.oh {
                break;
            }
            if ox >= g.ow {
                lane += pw - ox;
                continue;
            }
            let len = (g.ow - ox).min(nr - lane);
            segs[n] = (lane, len, oy * g.ow + ox);
            n += 1;
            lane += len;
        }
        (segs, n)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::skip_without_direct;
    use crate::kernels::test_util::{max_rel, rand_vec};

    /// The instruction sets whose kernels run on this CPU.
    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// Every position in exactly one tile; at 2x2 with a 3x3 kernel, tiles of 8 over the 4
    /// taps that read the image; at batch 1, one mixed tile over all 9.
    #[test]
    fn few_plan_skips_padding_taps() {
        let g = ConvGeom::new(8, 4, 2, 2, 16, 3, 3, 1, 1).expect("geom");
        let plan = FewPlan::new(&g, 8);
        assert_eq!(plan.tiles.len(), 4);
        let mut seen = vec![0; 32];
        for t in &plan.tiles {
            assert_eq!((t.len, plan.taps[t.set].len()), (8, 4));
            for &d in &plan.dst[t.start..t.start + t.len] {
                seen[d / (g.k * 4) * 4 + d % (g.k * 4)] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        let one = FewPlan::new(&g, 1);
        assert_eq!(
            one.tiles,
            vec![FewTile {
                start: 0,
                len: 4,
                set: 0,
                masked: true,
            }]
        );
        // Each tap masked to the positions it reads for: the centre tap for all four, an edge
        // tap for two, a corner tap for one; 16 products per channel instead of 36.
        let slots: Vec<u32> = one.taps[0].iter().map(|t| t.2.count_ones()).collect();
        assert_eq!(slots, [1, 2, 1, 2, 4, 2, 1, 2, 1]);
        assert_eq!(
            one.taps[0][0].2, 0b1000,
            "tap (0,0) serves only output (1,1)"
        );
        // The reads stay inside the image: (0,0) reads from offset 0, (1,1) up to h·w − 1.
        assert_eq!(one.reach, (0, 3));
    }

    /// The direct kernel against the portable GEMM path, over strides, paddings, kernel sizes,
    /// channel counts that do not fill a panel, and sizes whose grid rows straddle tiles.
    #[test]
    fn direct_matches_gemm_path() {
        if skip_without_direct("direct_matches_gemm_path") {
            return;
        }
        let cases = [
            // b, c, h, w, k, kh, stride, pad
            (1, 1, 48, 48, 64, 3, 1, 1),
            (2, 3, 13, 11, 17, 3, 1, 1),
            (1, 64, 12, 12, 128, 3, 2, 1),
            (3, 5, 9, 7, 33, 1, 2, 0),
            (2, 1, 48, 48, 64, 7, 2, 3),
            (1, 8, 6, 6, 16, 3, 1, 1),
            (2, 4, 5, 9, 7, 5, 3, 2),
            (1, 2, 20, 20, 1, 7, 1, 3),
            // Few positions per image (vectorised over output channels; micro-tiles straddle
            // images).
            (2, 40, 6, 6, 64, 3, 1, 1),
            (5, 8, 3, 3, 20, 3, 1, 1),
            (7, 16, 4, 4, 24, 3, 2, 1),
            (1, 20, 5, 7, 50, 3, 2, 1),
            (3, 12, 2, 2, 32, 3, 1, 1),
            (1, 64, 12, 12, 64, 1, 2, 0),
            // Positions grouped by the taps that read the image: groups of 8 (2x2 maps at
            // batch 8), interior and edge groups beside the mixed corners (6x6), stride 2, and
            // chunks of 3 images with a shorter last chunk (512 channels of 6x6 at batch 8).
            (8, 64, 2, 2, 40, 3, 1, 1),
            (6, 16, 3, 3, 16, 3, 2, 1),
            (3, 32, 6, 6, 20, 3, 1, 1),
            (8, 512, 6, 6, 16, 3, 1, 1),
            // A kernel of more than 64 taps on a small map (the grid kernel's case).
            (1, 3, 6, 6, 16, 9, 1, 4),
            // Padding wider than the kernel: the outer ring of outputs reads nothing.
            (2, 3, 2, 2, 5, 1, 1, 1),
        ];
        for (i, &(b, c, h, w, k, kh, s, p)) in cases.iter().enumerate() {
            let g = ConvGeom::new(b, c, h, w, k, kh, kh, s, p).expect("geom");
            let x = rand_vec(g.input_len(), 2 * i as u64);
            let wt = rand_vec(g.weight_len(), 2 * i as u64 + 1);
            let bias = rand_vec(k, 99);
            for (bias, relu) in [(None, false), (Some(&bias[..]), true)] {
                let want = crate::kernels::reference::conv2d_forward_gemm(&g, &x, &wt, bias, relu);
                let pw = PackedWeights::pack(&wt, k, c, kh, kh);
                for isa in isas() {
                    let got = conv_forward_with(isa, &g, &x, &pw, bias, relu);
                    assert_eq!(got.len(), want.len());
                    let err = max_rel(&got, &want);
                    assert!(err < 1e-5, "case {i} {g:?} {isa:?}: max rel err {err}");
                }
            }
        }
    }

    /// Half-precision panels change only the weights, each by at most 2⁻¹¹ of itself (2⁻²⁵
    /// absolute below half's normal range), so an output moves by at most 2⁻¹¹·Σ|w·x| +
    /// 2⁻²⁵·Σ|x| over its receptive field, up to f32 rounding (a quarter of that bound is
    /// allowed for it). A kernel reading the wrong weights errs by order Σ|w·x|.
    #[test]
    fn half_weights_within_their_rounding() {
        if skip_without_direct("half_weights_within_their_rounding") {
            return;
        }
        let cases = [
            // b, c, h, w, k, kh, stride, pad: tiny maps (masked tiles), a panel pair plus a
            // lone last panel (k = 40), partial panels (k = 20, 50), a 1x1 stride-2 layer.
            (1, 64, 2, 2, 96, 3, 1, 1),
            (1, 48, 3, 3, 40, 3, 2, 1),
            (5, 8, 3, 3, 20, 3, 1, 1),
            (2, 40, 6, 6, 64, 3, 1, 1),
            (1, 20, 5, 7, 50, 3, 2, 1),
            (1, 32, 12, 12, 48, 1, 2, 0),
        ];
        for (i, &(b, c, h, w, k, kh, s, p)) in cases.iter().enumerate() {
            let g = ConvGeom::new(b, c, h, w, k, kh, kh, s, p).expect("geom");
            assert!(few_positions(&g), "case {i}: not a few-positions layer");
            let x = rand_vec(g.input_len(), 3 * i as u64);
            // Weights over many binades, down to half's subnormals.
            let wt: Vec<f32> = rand_vec(g.weight_len(), 3 * i as u64 + 1)
                .iter()
                .enumerate()
                .map(|(j, v)| v * [1.0, 1e-3, 3e-6, 40.0][j % 4])
                .collect();
            let bias = rand_vec(k, 7);
            let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
            let f32w = PackedWeights::pack(&wt, k, c, kh, kh);
            let half = PackedWeights::pack_half(&wt, k, c, kh, kh).expect("in half's range");
            let mag = conv_forward(
                &g,
                &abs(&x),
                &PackedWeights::pack(&abs(&wt), k, c, kh, kh),
                None,
                false,
            );
            let ones = vec![1f32; g.weight_len()];
            let reach = conv_forward(
                &g,
                &abs(&x),
                &PackedWeights::pack(&ones, k, c, kh, kh),
                None,
                false,
            );
            for ((bias, relu), isa) in [(None, false), (Some(&bias[..]), true)]
                .into_iter()
                .flat_map(|br| isas().into_iter().map(move |isa| (br, isa)))
            {
                let want = conv_forward_with(isa, &g, &x, &f32w, bias, relu);
                let got = conv_forward_with(isa, &g, &x, &half, bias, relu);
                for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                    let bound = 1.25 * (mag[j] / 2048.0 + reach[j] / (1u32 << 25) as f32);
                    assert!(
                        (a - b).abs() <= bound,
                        "case {i} {g:?} {isa:?} output {j}: f16 {a} f32 {b}, bound {bound}"
                    );
                }
                assert!(
                    max_rel(&got, &want) > 0.0,
                    "case {i} {isa:?}: no weight was rounded"
                );
            }
        }
        // Beyond half's range, or not a number: no half panels (the caller keeps f32).
        for bad in [7e4, -1e5, f32::INFINITY, f32::NAN] {
            let mut wt = rand_vec(9 * 4 * 16, 1);
            wt[5] = bad;
            assert!(
                PackedWeights::pack_half(&wt, 16, 4, 3, 3).is_none(),
                "{bad}"
            );
        }
        let mut wt = rand_vec(9 * 4 * 16, 1);
        wt[5] = 65504.0;
        assert!(PackedWeights::pack_half(&wt, 16, 4, 3, 3).is_some());
    }
}
