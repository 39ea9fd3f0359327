// Cross-entropy with label smoothing ε over logits z [B, C], as torch's
// CrossEntropyLoss(label_smoothing=ε) and src/train/loss.rs:
//   q_c = ε/C + (c = y ? 1 − ε : 0),  lse = m + ln Σ_c exp(z_c − m),  m = max_c z_c,
//   loss = (1/B) Σ_rows −Σ_c q_c (z_c − lse),   dz_c = (exp(z_c − lse) − q_c) / B.
// In f64 after the f32 difference z_c − m, as the CPU reference does, so the gradients round to
// the same f32 values; the row sums use a fixed shuffle order and the batch sum runs in row
// order (deterministic). A label outside 0..C gives that row NaN loss and gradients.
//
//   cross_entropy_rows: row_loss [B] (f64) and dz [B, C]
//   cross_entropy_sum:  loss[0] = (f32)(Σ_rows row_loss / B), rows in order
//
// Launch shape: cross_entropy_rows: one warp per row, grid ceil(B / 4), block 128.
//   cross_entropy_sum: grid 1, block 32 (lane 0 adds).

__device__ __forceinline__ double ce_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float ce_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

extern "C" __global__ void __launch_bounds__(128)
cross_entropy_rows(const float* z, const int* labels, int B, int C, float smoothing, float off,
                   float* dz, double* row_loss) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= B) return;
    const long long base = (long long)row * C;
    const int y = labels[row];
    const float nan = __int_as_float(0x7fc00000);
    if (y < 0 || y >= C) {
        for (int c = lane; c < C; c += 32) dz[base + c] = nan;
        if (lane == 0) row_loss[row] = (double)nan;
        return;
    }
    float mx = __int_as_float(0xff800000);
    for (int c = lane; c < C; c += 32) mx = fmaxf(mx, z[base + c]);
    mx = ce_warp_max(mx);
    double s = 0.0;
    for (int c = lane; c < C; c += 32) s += exp((double)(z[base + c] - mx));
    const double lse = (double)mx + log(ce_warp_sum(s));
    const double batch = (double)B;
    double acc = 0.0;
    for (int c = lane; c < C; c += 32) {
        const float q = off + (c == y ? 1.f - smoothing : 0.f);
        acc += (double)q * ((double)z[base + c] - lse);
    }
    acc = ce_warp_sum(acc);
    if (lane == 0) row_loss[row] = -acc;
    // The gradient in a pass of its own: fused with the loss sum above, the f64 division's slow
    // path (a call) ran out of registers and spilled.
    for (int c = lane; c < C; c += 32) {
        const float q = off + (c == y ? 1.f - smoothing : 0.f);
        const double logp = (double)z[base + c] - lse;
        dz[base + c] = (float)((exp(logp) - (double)q) / batch);
    }
}

extern "C" __global__ void __launch_bounds__(32)
cross_entropy_sum(const double* row_loss, int B, float* loss) {
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int i = 0; i < B; ++i) total += row_loss[i];
    loss[0] = (float)(total / (double)B);
}

// Mean squared error of pred against target, both [R, K] (n = R·K values), as
// src/train/mim.rs `mse`:
//   loss = (1/n) Σ (p − t)²,  dp = 2 (p − t) / n,
// the difference in f32 then squared and summed in f64 as the CPU does; row sums in a fixed
// shuffle order, the total in row order (deterministic).
//
//   mse_rows: row_loss [R] (f64) = Σ_k (p − t)², and dp [R, K]
//   mse_sum:  loss[0] = (f32)(Σ_rows row_loss / n), rows in order
//
// Launch shape: mse_rows: one warp per row, grid ceil(R / 4), block 128.
//   mse_sum: grid 1, block 32 (lane 0 adds).

extern "C" __global__ void __launch_bounds__(128)
mse_rows(const float* pred, const float* target, int R, int K, double n, float* dp,
         double* row_loss) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= R) return;
    const long long base = (long long)row * K;
    double acc = 0.0;
    for (int k = lane; k < K; k += 32) {
        const float d = pred[base + k] - target[base + k];
        acc += (double)d * (double)d;
        dp[base + k] = (float)(2.0 * (double)d / n);
    }
    acc = ce_warp_sum(acc);
    if (lane == 0) row_loss[row] = acc;
}

extern "C" __global__ void __launch_bounds__(32)
mse_sum(const double* row_loss, int R, double n, float* loss) {
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int i = 0; i < R; ++i) total += row_loss[i];
    loss[0] = (float)(total / n);
}

// MOS's group-softmax loss over logits z [B, W], W = Σ_g (size_g + 1), as src/train/loss.rs
// `group_softmax`: group g owns the contiguous columns starts[g] .. starts[g + 1] (slot 0 its
// "others"), and y[g·B + i] is image i's target within that slice. Each slice is a plain
// cross-entropy (no smoothing), averaged over the batch, and the groups' losses add up:
//   lse_ig = m + ln Σ_{c∈g} exp(z_ic − m),  loss = Σ_g (f32)((1/B) Σ_i (lse_ig − z_{i,y}))
//   dz_ic = (exp(z_ic − lse_ig) − [c = y]) / B
// In f64 after the f32 difference z − m, as cross_entropy_rows; the group totals run over rows in
// order and are rounded to f32 and added in group order, as the CPU does (deterministic, no
// atomics). A target outside its slice gives NaN.
//
//   group_softmax_rows: row_loss [G, B] (f64) and dz [B, W]
//   group_softmax_sum:  loss[0] = Σ_g (f32)(Σ_i row_loss[g, i] / B), groups then rows in order
//
// Launch shape: group_softmax_rows: one warp per (image, group), grid ceil(B·G / 4), block 128.
//   group_softmax_sum: grid 1, block 32 (lane 0 adds).

extern "C" __global__ void __launch_bounds__(128)
group_softmax_rows(const float* z, const int* y, const int* starts, int B, int G, int W,
                   float* dz, double* row_loss) {
    const int lane = threadIdx.x & 31;
    const int pair = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= B * G) return;
    const int row = pair / G, g = pair % G;
    const int c0 = starts[g], w = starts[g + 1] - c0;
    const long long base = (long long)row * W + c0;
    const int t = y[g * B + row];
    const float nan = __int_as_float(0x7fc00000);
    if (t < 0 || t >= w) {
        for (int c = lane; c < w; c += 32) dz[base + c] = nan;
        if (lane == 0) row_loss[g * B + row] = (double)nan;
        return;
    }
    float mx = __int_as_float(0xff800000);
    for (int c = lane; c < w; c += 32) mx = fmaxf(mx, z[base + c]);
    mx = ce_warp_max(mx);
    double s = 0.0;
    for (int c = lane; c < w; c += 32) s += exp((double)(z[base + c] - mx));
    const double lse = (double)mx + log(ce_warp_sum(s));
    // The loss as cross_entropy_rows sums it (one nonzero term: the same value), and the
    // gradient in a pass of its own: written any other way, the f64 division's slow path (a
    // call) spilled here.
    double acc = 0.0;
    for (int c = lane; c < w; c += 32) {
        const float q = c == t ? 1.f : 0.f;
        acc += (double)q * ((double)z[base + c] - lse);
    }
    acc = ce_warp_sum(acc);
    if (lane == 0) row_loss[g * B + row] = -acc;
    const double batch = (double)B;
    for (int c = lane; c < w; c += 32) {
        const float q = c == t ? 1.f : 0.f;
        const double logp = (double)z[base + c] - lse;
        dz[base + c] = (float)((exp(logp) - (double)q) / batch);
    }
}

extern "C" __global__ void __launch_bounds__(32)
group_softmax_sum(const double* row_loss, int B, int G, float* loss) {
    if (threadIdx.x != 0) return;
    float total = 0.f;
    for (int g = 0; g < G; ++g) {
        double t = 0.0;
        for (int i = 0; i < B; ++i) t += row_loss[g * B + i];
        total += (float)(t / (double)B);
    }
    loss[0] = total;
}

// MODE's ALPA head (src/train/alpa.rs): the ReLU of its MLPs and the element-wise and reduction
// steps of the cross-view attention terms, whose contractions are cuBLAS GEMMs
// (src/backend/cuda/loss.rs).
//
//   alpa_relu:          y = max(x, 0)
//   alpa_relu_backward: dy = (y > 0 ? dy : 0), in place
//
// With q, k, v [R = M·T, D] (M views of T tokens; row b·T + p is token p of view b) and
// inv = 1/√D, the terms t(b←a) = Σ_p cos(v_{bT+p}, x̃[b, p, a]), x̃ = softmax(q K_aᵀ·inv)·V_a, are
// computed one block of nb query views × na source views at a time, its scratch laid out so that
// the score GEMM is one product: S = Q_blk K_blkᵀ·inv is [nb·T, na·T] row-major, i.e. the
// T-long segment (r, a) holds the scores of query row r against source view a's keys, at
// segment index r·na + a; x̃ [nb·T, na, D] the same way (row (r, a) at r·na + a).
//
//   alpa_softmax:          P = softmax of each T-segment of S, in place
//   alpa_cos_terms:        terms[b·M + a] = Σ_p cos(v_{bT+p}, x̃[(b, p), a])   (p in order)
//   alpa_cos_backward:     for g = ∂L/∂terms [M, M], gc = g[b·M + a], n_v, n_x the norms
//                          clamped at 1e-8 and c the cosine:
//                            dv_r += Σ_a gc (x̃/(n_v n_x) − c·v_r/n_v²)   (a in order)
//                            x̃ ← dx̃ = gc (v_r/(n_v n_x) − c·x̃/n_x²)      (in place; 0 if gc = 0)
//   alpa_softmax_backward: dP ← dS = P ⊙ (dP − Σ_j P_j dP_j)·inv, per segment, in place
//
// Every sum is a loop in order in one thread or a fixed shuffle tree in one warp (f32, as the
// CPU's), and each output has one writer, so a run repeats bit for bit; no atomics.
//
// Launch shape: block 128. alpa_relu, alpa_relu_backward: one thread per value, grid
//   ceil(n / 128). alpa_softmax, alpa_softmax_backward: one warp per T-segment, grid
//   ceil(segments / 4). alpa_cos_terms: one thread per (b, a) pair of the block; alpa_cos_backward:
//   one thread per query row of the block (its dv row has no other writer); grid
//   ceil(items / 128). Their work is O(pairs·T·D), against the GEMMs' O(pairs·T²·D).

extern "C" __global__ void __launch_bounds__(128)
alpa_relu(const float* x, float* y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fmaxf(x[i], 0.f);
}

extern "C" __global__ void __launch_bounds__(128)
alpa_relu_backward(const float* y, float* dy, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && !(y[i] > 0.f)) dy[i] = 0.f;
}

__device__ __forceinline__ float alpa_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(128)
alpa_softmax(float* s, long long segments, int T) {
    const int lane = threadIdx.x & 31;
    const long long seg = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (seg >= segments) return;
    float* p = s + seg * T;
    float mx = __int_as_float(0xff800000);
    for (int j = lane; j < T; j += 32) mx = fmaxf(mx, p[j]);
    mx = ce_warp_max(mx);
    float sum = 0.f;
    for (int j = lane; j < T; j += 32) {
        const float e = expf(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    sum = alpa_warp_sum(sum);
    for (int j = lane; j < T; j += 32) p[j] /= sum;
}

// |x|² and v_r·x over D columns, in order.
__device__ __forceinline__ void alpa_dots(const float* vr, const float* xr, int D, float* xx,
                                          float* ux) {
    float b = 0.f, c = 0.f;
    for (int i = 0; i < D; ++i) {
        const float x = xr[i];
        b += x * x;
        c += vr[i] * x;
    }
    *xx = b;
    *ux = c;
}

__device__ __forceinline__ float alpa_sq_norm(const float* vr, int D) {
    float a = 0.f;
    for (int i = 0; i < D; ++i) a += vr[i] * vr[i];
    return a;
}

extern "C" __global__ void __launch_bounds__(128)
alpa_cos_terms(const float* v, const float* x, int M, int T, int D, int b0, int nb, int a0,
               int na, float* terms) {
    const int pair = blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= nb * na) return;
    const int bi = pair / na, ai = pair % na;
    float t = 0.f;
    for (int p = 0; p < T; ++p) {
        const long long r = (long long)bi * T + p;
        const float* vr = v + ((long long)b0 * T + r) * D;
        float xx, ux;
        alpa_dots(vr, x + (r * na + ai) * D, D, &xx, &ux);
        t += ux / (fmaxf(sqrtf(alpa_sq_norm(vr, D)), 1e-8f) * fmaxf(sqrtf(xx), 1e-8f));
    }
    terms[(b0 + bi) * M + a0 + ai] = t;
}

extern "C" __global__ void __launch_bounds__(128)
alpa_cos_backward(const float* v, float* x, const float* g, int M, int T, int D, int b0, int nb,
                  int a0, int na, float* dv) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= (long long)nb * T) return;
    const int b = b0 + (int)(r / T);
    const float* vr = v + ((long long)b0 * T + r) * D;
    float* dvr = dv + ((long long)b0 * T + r) * D;
    const float nu = fmaxf(sqrtf(alpa_sq_norm(vr, D)), 1e-8f);
    for (int ai = 0; ai < na; ++ai) {
        float* xr = x + (r * na + ai) * D;
        const float gc = g[b * M + a0 + ai];
        if (gc == 0.f) {
            for (int i = 0; i < D; ++i) xr[i] = 0.f;
            continue;
        }
        float xx, ux;
        alpa_dots(vr, xr, D, &xx, &ux);
        const float nx = fmaxf(sqrtf(xx), 1e-8f);
        const float cs = ux / (nu * nx);
        const float inv_ux = gc / (nu * nx), cu = gc * cs / (nu * nu), cx = gc * cs / (nx * nx);
        for (int i = 0; i < D; ++i) {
            const float xv = xr[i], u = vr[i];
            dvr[i] += xv * inv_ux - u * cu;
            xr[i] = u * inv_ux - xv * cx;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
alpa_softmax_backward(const float* p, float* dp, long long segments, int T, float inv) {
    const int lane = threadIdx.x & 31;
    const long long seg = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (seg >= segments) return;
    const float* pr = p + seg * T;
    float* dr = dp + seg * T;
    float dot = 0.f;
    for (int j = lane; j < T; j += 32) dot += pr[j] * dr[j];
    dot = alpa_warp_sum(dot);
    for (int j = lane; j < T; j += 32) dr[j] = pr[j] * (dr[j] - dot) * inv;
}
