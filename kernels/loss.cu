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

// MODE's ALPA head (src/train/alpa.rs): the ReLU of its MLPs and the cross-view attention terms.
//
//   alpa_relu:          y = max(x, 0)
//   alpa_relu_backward: dy = (y > 0 ? dy : 0), in place
//
// With q, k, v [R = M·T, D] (M views of T tokens; row r = b·T + p is token p of view b) and
// inv = 1/√D, for every source view a and row r:
//   P[a, r, j] = softmax_j(q_r · k_{aT+j} · inv),  x[a, r] = Σ_j P[a, r, j] v_{aT+j},
//   cos[a, r]  = v_r · x / (max(|v_r|, 1e-8) · max(|x|, 1e-8))
//   terms[b·M + a] = Σ_p cos[a, b·T + p]                       (p in order)
// and back, for g = ∂L/∂terms [M, M]: with gc = g[b·M + a] and n_v, n_x the clamped norms,
//   dv_r  += Σ_a gc (x/(n_v n_x) − cos·v_r/n_v²),   dx[a, r] = gc (v_r/(n_v n_x) − cos·x/n_x²),
//   dS_j   = P_j (dx · v_{aT+j} − Σ_i P_i dx · v_{aT+i}) · inv,
//   dq_r   = Σ_a Σ_j dS_j k_{aT+j},
//   dk_{aT+j} = Σ_r dS[a, r, j] q_r,   dv_{aT+j} += Σ_r P[a, r, j] dx[a, r].
// Every sum runs in a fixed order in one thread (f32, as the CPU's), so a run repeats bit for
// bit; no atomics. The backward is two kernels: one thread per query row (dq, the cosine's dv,
// and P, dS, dx kept for the second), then one thread per key row (dk and the attention's dv).
//
//   alpa_cross_rows:           P [M, R, T] (scratch), cos [M, R]     thread per (a, r)
//   alpa_cross_sum:            terms [M, M]                          thread per (b, a)
//   alpa_cross_backward_rows:  dq, dv [R, D]; P, dS [M, R, T], dx [M, R, D]   thread per r
//   alpa_cross_backward_keys:  dk [R, D]; dv += (attention part)     thread per key row
//
// Launch shape: 1-D, block 128, grid ceil(count / 128).

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

// P[a, r, :] = softmax(q_r · k_a[j] · inv) into p (T values).
__device__ void alpa_probs(const float* qr, const float* ka, int T, int D, float inv, float* p) {
    float mx = __int_as_float(0xff800000);
    for (int j = 0; j < T; ++j) {
        float s = 0.f;
        for (int c = 0; c < D; ++c) s += qr[c] * ka[(long long)j * D + c];
        s *= inv;
        p[j] = s;
        mx = fmaxf(mx, s);
    }
    float sum = 0.f;
    for (int j = 0; j < T; ++j) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    for (int j = 0; j < T; ++j) p[j] /= sum;
}

extern "C" __global__ void __launch_bounds__(128)
alpa_cross_rows(const float* q, const float* k, const float* v, int M, int T, int D, float inv,
                float* probs, float* cosv) {
    const long long R = (long long)M * T;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)M * R) return;
    const int a = (int)(i / R);
    const long long r = i % R;
    const float* ka = k + (long long)a * T * D;
    const float* va = v + (long long)a * T * D;
    const float* vr = v + r * D;
    float* p = probs + i * T;
    alpa_probs(q + r * D, ka, T, D, inv, p);
    float uu = 0.f, xx = 0.f, ux = 0.f;
    for (int c = 0; c < D; ++c) {
        float x = 0.f;
        for (int j = 0; j < T; ++j) x += p[j] * va[(long long)j * D + c];
        uu += vr[c] * vr[c];
        xx += x * x;
        ux += vr[c] * x;
    }
    cosv[i] = ux / (fmaxf(sqrtf(uu), 1e-8f) * fmaxf(sqrtf(xx), 1e-8f));
}

extern "C" __global__ void __launch_bounds__(128)
alpa_cross_sum(const float* cosv, int M, int T, float* terms) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * M) return;
    const int b = i / M, a = i % M;
    const long long R = (long long)M * T;
    float t = 0.f;
    for (int p = 0; p < T; ++p) t += cosv[a * R + (long long)b * T + p];
    terms[i] = t;
}

extern "C" __global__ void __launch_bounds__(128)
alpa_cross_backward_rows(const float* q, const float* k, const float* v, int M, int T, int D,
                         float inv, const float* g, float* probs, float* dsc, float* dx,
                         float* dq, float* dv) {
    const long long R = (long long)M * T;
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    const int b = (int)(r / T);
    const float* qr = q + r * D;
    const float* vr = v + r * D;
    for (int c = 0; c < D; ++c) {
        dq[r * D + c] = 0.f;
        dv[r * D + c] = 0.f;
    }
    for (int a = 0; a < M; ++a) {
        const long long i = (long long)a * R + r;
        const float* ka = k + (long long)a * T * D;
        const float* va = v + (long long)a * T * D;
        float* p = probs + i * T;
        float* ds = dsc + i * T;
        float* xr = dx + i * D;
        alpa_probs(qr, ka, T, D, inv, p);
        float uu = 0.f, xx = 0.f, ux = 0.f;
        for (int c = 0; c < D; ++c) {
            float x = 0.f;
            for (int j = 0; j < T; ++j) x += p[j] * va[(long long)j * D + c];
            xr[c] = x;
            uu += vr[c] * vr[c];
            xx += x * x;
            ux += vr[c] * x;
        }
        const float gc = g[b * M + a];
        if (gc != 0.f) {
            const float nu = fmaxf(sqrtf(uu), 1e-8f), nx = fmaxf(sqrtf(xx), 1e-8f);
            const float cs = ux / (nu * nx);
            const float inv_ux = gc / (nu * nx), cu = gc * cs / (nu * nu),
                        cx = gc * cs / (nx * nx);
            for (int c = 0; c < D; ++c) {
                const float x = xr[c];
                dv[r * D + c] += x * inv_ux - vr[c] * cu;
                xr[c] = vr[c] * inv_ux - x * cx;
            }
        } else {
            for (int c = 0; c < D; ++c) xr[c] = 0.f;
        }
        float dot = 0.f;
        for (int j = 0; j < T; ++j) {
            float s = 0.f;
            for (int c = 0; c < D; ++c) s += xr[c] * va[(long long)j * D + c];
            ds[j] = s;
            dot += p[j] * s;
        }
        for (int j = 0; j < T; ++j) ds[j] = p[j] * (ds[j] - dot) * inv;
        for (int c = 0; c < D; ++c) {
            float s = 0.f;
            for (int j = 0; j < T; ++j) s += ds[j] * ka[(long long)j * D + c];
            dq[r * D + c] += s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
alpa_cross_backward_keys(const float* q, int M, int T, int D, const float* probs,
                         const float* dsc, const float* dx, float* dk, float* dv) {
    const long long R = (long long)M * T;
    const long long kr = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (kr >= R) return;
    const int a = (int)(kr / T), j = (int)(kr % T);
    for (int c = 0; c < D; ++c) {
        float sk = 0.f, sv = 0.f;
        for (long long r = 0; r < R; ++r) {
            const long long i = (long long)a * R + r;
            sk += dsc[i * T + j] * q[r * D + c];
            sv += probs[i * T + j] * dx[i * D + c];
        }
        dk[kr * D + c] = sk;
        dv[kr * D + c] += sv;
    }
}
