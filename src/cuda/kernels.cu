// fer-cam's own CUDA kernels, compiled at run time by NVRTC (src/cuda/mod.rs) for the GPU that is
// present. Each has a CPU twin that is the reference, and a parity test in tests/cuda.rs:
//
//   card_embed    <-> FusedCard::embed + lin1_f (src/kernels/sampler.rs)
//   card_chain    <-> FusedCard::chain          (src/kernels/sampler.rs)
//   card_summary  <-> sample_probs_rows + metrics::sample_stats
//   crop_faces    <-> face::crop_face + Classifier::preprocess
//
// Weights are stored transposed where threads of a block read one column each ([k * H + j]:
// neighbouring threads read neighbouring floats).

// NVRTC has no <math.h>: the double constants by their bits.
#define F_INF __longlong_as_double(0x7ff0000000000000LL)
#define F_NAN __longlong_as_double(0x7ff8000000000000LL)

__device__ __forceinline__ float softplus(float x) {
    return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

// One block per face: the image embedding emb = scale * (We x) + shift and the f half of the
// first layer, fpart = W1_f f. feats (b, F), f (b, C); we_t (F, H), w1f_t (C, H).
extern "C" __global__ void card_embed(
    const float* feats, const float* f, const float* we_t, const float* e_scale,
    const float* e_shift, const float* w1f_t, int F, int C, int H, float* emb, float* fpart) {
    const int face = blockIdx.x;
    const float* x = feats + (size_t)face * F;
    const float* fv = f + (size_t)face * C;
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < F; ++k) acc += we_t[(size_t)k * H + j] * x[k];
        emb[(size_t)face * H + j] = e_scale[j] * acc + e_shift[j];
        float part = 0.0f;
        for (int c = 0; c < C; ++c) part += w1f_t[(size_t)c * H + j] * fv[c];
        fpart[(size_t)face * H + j] = part;
    }
}

#define MAX_ROWS 8

// The whole reverse chain of `rpb` rows per block (rows = faces x samples, each face's samples
// together), every step in one launch. Per step and row:
//   h1 = softplus(A1_t * (W1_y y + fpart) + B1_t) * emb
//   h2 = softplus(A2_t * (W2 h1) + B2_t);  h3 = softplus(A3_t * (W3 h2) + B3_t)
//   eps = Wo h3 + bo;  y0 = (y - f (1 - sab) - eps somab) / sab
//   y <- y0 on the last step, else g0 y0 + g1 y + g2 f + sqrt(var) z.
// noise (steps, n, C): the prior's draw, then one per step but the last. coef (steps, 8):
// sab, 1 - sab, somab, g0, g1, g2, sqrt(var), last. a*/b* (T, H); ts (steps) the timesteps.
// Shared memory: rpb * (2 H + 2 C) floats.
extern "C" __global__ void card_chain(
    const float* emb, const float* fpart, const float* f, const float* noise,
    const float* w1y_t, const float* w2_t, const float* w3_t, const float* wo, const float* bo,
    const float* a1, const float* b1, const float* a2, const float* b2, const float* a3,
    const float* b3, const int* ts, const float* coef, int steps, int n, int samples, int C,
    int H, int rpb, float* y_out) {
    extern __shared__ float sm[];
    float* y = sm;                   // rpb * C
    float* eps = y + rpb * C;        // rpb * C
    float* h1 = eps + rpb * C;       // rpb * H
    float* h2 = h1 + rpb * H;        // rpb * H
    const int tid = threadIdx.x, bd = blockDim.x;
    const int row0 = blockIdx.x * rpb;
    const int rows = min(rpb, n - row0);
    if (rows <= 0) return;
    const int rc = rows * C;

    // The prior y_T = f + z.
    for (int o = tid; o < rc; o += bd) {
        const int r = o / C, c = o % C, face = (row0 + r) / samples;
        y[o] = f[(size_t)face * C + c] + noise[(size_t)(row0 + r) * C + c];
    }
    __syncthreads();

    for (int k = 0; k < steps; ++k) {
        const int t = ts[k];
        const float* A1 = a1 + (size_t)t * H; const float* B1 = b1 + (size_t)t * H;
        const float* A2 = a2 + (size_t)t * H; const float* B2 = b2 + (size_t)t * H;
        const float* A3 = a3 + (size_t)t * H; const float* B3 = b3 + (size_t)t * H;
        // Layer 1.
        for (int j = tid; j < H; j += bd) {
            for (int r = 0; r < rows; ++r) {
                const int face = (row0 + r) / samples;
                float acc = 0.0f;
                for (int c = 0; c < C; ++c) acc += w1y_t[(size_t)c * H + j] * y[r * C + c];
                const float x = acc + fpart[(size_t)face * H + j];
                h1[r * H + j] = softplus(A1[j] * x + B1[j]) * emb[(size_t)face * H + j];
            }
        }
        __syncthreads();
        // Layers 2 and 3: h1 -> h2 -> h1, each weight read once for all the block's rows.
        for (int layer = 0; layer < 2; ++layer) {
            const float* wt = layer == 0 ? w2_t : w3_t;
            const float* A = layer == 0 ? A2 : A3;
            const float* B = layer == 0 ? B2 : B3;
            const float* in = layer == 0 ? h1 : h2;
            float* out = layer == 0 ? h2 : h1;
            for (int j = tid; j < H; j += bd) {
                float acc[MAX_ROWS];
                for (int r = 0; r < MAX_ROWS; ++r) acc[r] = 0.0f;
                for (int kk = 0; kk < H; ++kk) {
                    const float w = wt[(size_t)kk * H + j];
#pragma unroll
                    for (int r = 0; r < MAX_ROWS; ++r)
                        if (r < rows) acc[r] += w * in[r * H + kk];
                }
                for (int r = 0; r < rows; ++r) out[r * H + j] = softplus(A[j] * acc[r] + B[j]);
            }
            __syncthreads();
        }
        // Output layer: one warp per (row, class), lanes split the hidden units.
        const int warp = tid / 32, lane = tid % 32, warps = bd / 32;
        for (int o = warp; o < rc; o += warps) {
            const int r = o / C, c = o % C;
            float s = 0.0f;
            for (int kk = lane; kk < H; kk += 32) s += wo[(size_t)c * H + kk] * h1[r * H + kk];
            for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
            if (lane == 0) eps[o] = s + bo[c];
        }
        __syncthreads();
        // The reverse step.
        const float* co = coef + (size_t)k * 8;
        const bool last = co[7] != 0.0f;
        for (int o = tid; o < rc; o += bd) {
            const int r = o / C, c = o % C, row = row0 + r, face = row / samples;
            const float fv = f[(size_t)face * C + c], yv = y[o];
            const float y0 = (yv - fv * co[1] - eps[o] * co[2]) / co[0];
            if (last) {
                y[o] = y0;
            } else {
                const float z = noise[((size_t)(k + 1) * n + row) * C + c];
                y[o] = co[3] * y0 + co[4] * yv + co[5] * fv + co[6] * z;
            }
        }
        __syncthreads();
    }
    for (int o = tid; o < rc; o += bd) y_out[(size_t)row0 * C + o] = y[o];
}

// One thread per face: per-sample probabilities softmax(-(y - 1)^2 / temp) (in double, then
// float), their mean, the votes (argmax, first on ties), the two most-voted classes (ties to
// the lower index) and the paired t statistic between them (NaN when undefined, +-inf when
// the differences have no spread but a non-zero mean). y0 and probs (faces, S, C); out
// (faces, 2 C + 3): the mean probabilities, the vote counts, the top two, t (one buffer, so
// that one copy brings it all back).
extern "C" __global__ void card_summary(
    const float* y0, int faces, int S, int C, double temp, float* probs, double* out) {
    const int face = blockIdx.x * blockDim.x + threadIdx.x;
    if (face >= faces) return;
    const float* yf = y0 + (size_t)face * S * C;
    float* pf = probs + (size_t)face * S * C;
    double* o = out + (size_t)face * (2 * C + 3);
    double* cnt = o + C;
    // The mean is summed in float, in sample order, as the CPU twin sums it.
    for (int c = 0; c < C; ++c) cnt[c] = 0.0;
    for (int s = 0; s < S; ++s) {
        const float* yr = yf + (size_t)s * C;
        float* pr = pf + (size_t)s * C;
        double mx = -F_INF;
        for (int c = 0; c < C; ++c) {
            const double d = (double)yr[c] - 1.0;
            mx = fmax(mx, -(d * d) / temp);
        }
        double z = 0.0;
        for (int c = 0; c < C; ++c) {
            const double d = (double)yr[c] - 1.0;
            z += exp(-(d * d) / temp - mx);
        }
        int best = 0;
        for (int c = 0; c < C; ++c) {
            const double d = (double)yr[c] - 1.0;
            pr[c] = (float)(exp(-(d * d) / temp - mx) / z);
            if (pr[c] > pr[best]) best = c;
        }
        cnt[best] += 1.0;
    }
    for (int c = 0; c < C; ++c) {
        float m_acc = 0.0f;
        for (int s = 0; s < S; ++s) m_acc += pf[(size_t)s * C + c];
        o[c] = (double)(m_acc / (float)(S > 0 ? S : 1));
    }
    int a = 0;
    for (int c = 1; c < C; ++c) if (cnt[c] > cnt[a]) a = c;
    int b = a;
    for (int c = 0; c < C; ++c)
        if (c != a && (b == a || cnt[c] > cnt[b])) b = c;
    o[2 * C] = a;
    o[2 * C + 1] = b;
    double t = F_NAN;
    bool finite = true;
    for (int s = 0; s < S; ++s) {
        const float* pr = pf + (size_t)s * C;
        finite = finite && isfinite(pr[a]) && isfinite(pr[b]);
    }
    if (a != b && finite && S >= 2) {
        double sum = 0.0;
        for (int s = 0; s < S; ++s) sum += (double)pf[s * C + a] - (double)pf[s * C + b];
        const double dm = sum / S;
        double var = 0.0;
        for (int s = 0; s < S; ++s) {
            const double d = (double)pf[s * C + a] - (double)pf[s * C + b] - dm;
            var += d * d;
        }
        var /= (S - 1);
        const double se = sqrt(var / S);
        if (se == 0.0) t = dm == 0.0 ? F_NAN : (dm > 0.0 ? F_INF : -F_INF);
        else t = dm / se;
    }
    o[2 * C + 2] = t;
}

// One thread per output pixel of `boxes` (b, 3: x0, y0, side of the square in whole pixels,
// as crop_face rounds them) on a gray frame (h, w): the square, clamped to the frame (edge
// pixels repeat), resized to out x out with a triangle filter (support scaled by the ratio,
// rows first in float, then columns, rounded to the nearest grey level), then normalised
// (v / 255 - mean) / std. out_x (b, 1, out, out).
__device__ __forceinline__ void taps(int o, int n, int out, int* left, int* right, float* centre,
                                     float* sratio) {
    const float ratio = (float)n / (float)out;
    *sratio = ratio < 1.0f ? 1.0f : ratio;
    const float support = 1.0f * *sratio;
    const float c = ((float)o + 0.5f) * ratio;
    long long l = (long long)floorf(c - support);
    l = l < 0 ? 0 : (l > n - 1 ? n - 1 : l);
    long long r = (long long)ceilf(c + support);
    r = r < l + 1 ? l + 1 : (r > n ? n : r);
    *left = (int)l;
    *right = (int)r;
    *centre = c - 0.5f;
}

__device__ __forceinline__ float tri(float x) {
    const float a = fabsf(x);
    return a < 1.0f ? 1.0f - a : 0.0f;
}

extern "C" __global__ void crop_faces(
    const unsigned char* gray, int w, int h, const int* boxes, int b, int out, float mean,
    float std_, float* out_x) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= b * out * out) return;
    const int face = idx / (out * out), oy = (idx / out) % out, ox = idx % out;
    const int x0 = boxes[face * 3], y0 = boxes[face * 3 + 1], n = boxes[face * 3 + 2];
    float v;
    if (n == out) {
        int yy = min(max(y0 + oy, 0), h - 1), xx = min(max(x0 + ox, 0), w - 1);
        v = (float)gray[(size_t)yy * w + xx];
    } else {
        int yl, yr, xl, xr;
        float yc, xc, ys, xs;
        taps(oy, n, out, &yl, &yr, &yc, &ys);
        taps(ox, n, out, &xl, &xr, &xc, &xs);
        float ysum = 0.0f, xsum = 0.0f;
        for (int i = yl; i < yr; ++i) ysum += tri(((float)i - yc) / ys);
        for (int i = xl; i < xr; ++i) xsum += tri(((float)i - xc) / xs);
        float t = 0.0f;
        for (int i = xl; i < xr; ++i) {
            const int xx = min(max(x0 + i, 0), w - 1);
            float col = 0.0f;
            for (int j = yl; j < yr; ++j) {
                const int yy = min(max(y0 + j, 0), h - 1);
                col += (float)gray[(size_t)yy * w + xx] * (tri(((float)j - yc) / ys) / ysum);
            }
            t += col * (tri(((float)i - xc) / xs) / xsum);
        }
        // roundf rounds halves away from zero, as Rust's f32::round in the twin.
        v = roundf(fminf(fmaxf(t, 0.0f), 255.0f));
    }
    out_x[idx] = ((float)(unsigned char)v / 255.0f - mean) / std_;
}
