// The backward of the convolutional ops (kernels/conv.cu) and BatchNorm in training mode, on NHWC
// maps x [B, H, W, C] (rows = B·H·W, channels innermost), all f32, as the CPU ops of
// src/backend/cpu/conv_grad.rs; launchers in src/backend/cuda/conv_grad.rs. No atomics: every sum
// runs in a fixed order, so a repeat gives the same bits.
//
//   batch_norm_sum_part:  per chunk p of R rows and channel c, in f64:
//                           what 0: s1 = Σ x;  what 1: s1 = Σ (x − mean[c])²;
//                           what 2: s1 = Σ dy, s2 = Σ dy·x̂   (part[p, c])
//   batch_norm_mean_finish: mean[c] = Σ_p s1[p, c] / rows (chunks in order, f64)
//   batch_norm_var_finish:  ss = Σ_p s1[p, c];  rstd = 1/√(ss/rows + eps);  mean32 = (f32)mean;
//                           running: μ ← (1−m)·μ + m·mean,  σ² ← (1−m)·σ² + m·ss/max(rows−1, 1)
//                           (torch's unbiased update), in f64, stored f32
//   batch_norm_fwd_apply:   x̂ = (x − mean32)·rstd,  y = x̂·γ + β
//   batch_norm_bwd_finish:  dγ = Σ_p s2,  dβ = Σ_p s1,  mean_g = γ·dβ/rows,  mean_gx = γ·dγ/rows
//   batch_norm_bwd_apply:   dx = rstd·((dy·γ − mean_g) − x̂·mean_gx)
//   relu_f32:               x = max(x, 0) in place (NaN → 0, as Rust's f32::max)
//   relu_backward_f32:      dx = dy where y > 0, else 0
//   max_pool_backward_f32:  a gather: dx[b, iy, ix, c] = Σ dy[b, oy, ox, c] over the windows that
//                           contain (iy, ix) and whose argmax it is (the first maximum in row-major
//                           window order, a NaN replacing it, padded taps never win: the CPU's
//                           rule), windows in (oy, ox) order, the CPU's order of adds
//   mean_hw_backward_f32:   dx[b, y, x, c] = dy[b, c]·scale  (scale = 1/(H·W) from the host)
//   conv_col2im_f32:        the adjoint of conv_im2col as a gather: dx[b, iy, ix, c] =
//                           Σ dcols[(b·Ho + oy)·Wo + ox, (i·k + j)·C + c] over the output
//                           positions (oy, ox) whose tap (i, j) = (iy + p − oy·s, ix + p − ox·s)
//                           lies in the k×k window, in (oy, ox) order (the CPU col2im's order)
//   sgd_momentum_f32:       d = g + wd·w;  buf = μ·buf + d;  w = w − lr·buf   (torch.optim.SGD,
//                           as sgd_update in src/train/mode.rs)
// Every f32 operation the CPU does on its own is rounded on its own here (_rn intrinsics: no FMA
// contraction), so the elementwise results give the CPU's bits; the f64 channel sums differ from
// the CPU's only in order (far below f32 rounding).
//
// Launch shape: batch_norm_sum_part: grid (ceil(C/32), P), block 256 (exactly: 32 channels × 8
//   row lanes, the lanes' f64 partials combined in lane order through static shared memory);
//   the finishes: grid-stride over C; every other kernel: grid-stride over its output elements
//   (consecutive threads on consecutive channels), block 256, grid = min(ceil(n/256), 8·SMs).

#ifdef MOOD_SIM_HOST
// The stand-in compiles for the host without FMA, where plain operators round each step.
__device__ __forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__device__ __forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__device__ __forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__device__ __forceinline__ double __dmul_rn(double a, double b) { return a * b; }
__device__ __forceinline__ double __dadd_rn(double a, double b) { return a + b; }
__device__ __forceinline__ double __dsub_rn(double a, double b) { return a - b; }
__device__ __forceinline__ double __ddiv_rn(double a, double b) { return a / b; }
__device__ __forceinline__ double __dsqrt_rn(double a) { return sqrt(a); }
#endif

#define CG_GRID_STRIDE(e, n)                                                          \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n); \
         e += (long long)gridDim.x * blockDim.x)

// ---- BatchNorm (training) ----

extern "C" __global__ void __launch_bounds__(256)
batch_norm_sum_part(const float* __restrict__ a, const float* __restrict__ b,
                    const double* __restrict__ mean, int what, int rows, int C, int R,
                    double* __restrict__ part1, double* __restrict__ part2) {
    __shared__ double s1[8][32];
    __shared__ double s2[8][32];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx, p = blockIdx.y;
    const int r0 = p * R, r1 = min(rows, r0 + R);
    double acc1 = 0.0, acc2 = 0.0;
    if (c < C) {
        const double m = what == 1 ? mean[c] : 0.0;
        for (int r = r0 + ty; r < r1; r += 8) {
            const long long at = (long long)r * C + c;
            const double v = a[at];
            if (what == 0) {
                acc1 = __dadd_rn(acc1, v);
            } else if (what == 1) {
                const double d = __dsub_rn(v, m);
                acc1 = __dadd_rn(acc1, __dmul_rn(d, d));
            } else {
                acc1 = __dadd_rn(acc1, v);
                acc2 = __dadd_rn(acc2, __dmul_rn(v, (double)b[at]));  // exact product
            }
        }
    }
    s1[ty][tx] = acc1;
    s2[ty][tx] = acc2;
    __syncthreads();
    if (ty == 0 && c < C) {
        double t1 = 0.0, t2 = 0.0;
        for (int l = 0; l < 8; ++l) {
            t1 = __dadd_rn(t1, s1[l][tx]);
            t2 = __dadd_rn(t2, s2[l][tx]);
        }
        part1[(long long)p * C + c] = t1;
        if (what == 2) part2[(long long)p * C + c] = t2;
    }
}

// Σ_p part[p, c] over the P chunks, in chunk order.
__device__ __forceinline__ double bn_chunk_sum(const double* part, int P, int C, int c) {
    double s = 0.0;
    for (int p = 0; p < P; ++p) s = __dadd_rn(s, part[(long long)p * C + c]);
    return s;
}

extern "C" __global__ void __launch_bounds__(256)
batch_norm_mean_finish(const double* __restrict__ part, int P, int C, int rows,
                       double* __restrict__ mean) {
    CG_GRID_STRIDE(c, C) mean[c] = __ddiv_rn(bn_chunk_sum(part, P, C, (int)c), (double)rows);
}

extern "C" __global__ void __launch_bounds__(256)
batch_norm_var_finish(const double* __restrict__ part, int P, int C, int rows,
                      const double* __restrict__ mean, float momentum, float eps,
                      float* __restrict__ rstd, float* __restrict__ mean32,
                      float* __restrict__ run_mean, float* __restrict__ run_var) {
    CG_GRID_STRIDE(e, C) {
        const int c = (int)e;
        const double ss = bn_chunk_sum(part, P, C, c);
        const double var = __ddiv_rn(ss, (double)rows);
        rstd[c] = (float)__ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, (double)eps)));
        mean32[c] = (float)mean[c];
        const double m = (double)momentum, keep = __dsub_rn(1.0, m);
        const double unbiased = fmax((double)rows - 1.0, 1.0);
        run_mean[c] = (float)__dadd_rn(__dmul_rn(keep, (double)run_mean[c]), __dmul_rn(m, mean[c]));
        run_var[c] = (float)__dadd_rn(__dmul_rn(keep, (double)run_var[c]),
                                      __ddiv_rn(__dmul_rn(m, ss), unbiased));
    }
}

extern "C" __global__ void __launch_bounds__(256)
batch_norm_fwd_apply(const float* __restrict__ x, const float* __restrict__ mean32,
                     const float* __restrict__ rstd, const float* __restrict__ gamma,
                     const float* __restrict__ beta, float* __restrict__ xhat,
                     float* __restrict__ y, long long n, int C) {
    CG_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const float xh = __fmul_rn(__fsub_rn(x[e], mean32[c]), rstd[c]);
        xhat[e] = xh;
        y[e] = __fadd_rn(__fmul_rn(xh, gamma[c]), beta[c]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
batch_norm_bwd_finish(const double* __restrict__ part_dy, const double* __restrict__ part_dyx,
                      int P, int C, int rows, const float* __restrict__ gamma,
                      float* __restrict__ dgamma, float* __restrict__ dbeta,
                      float* __restrict__ mean_g, float* __restrict__ mean_gx) {
    CG_GRID_STRIDE(e, C) {
        const int c = (int)e;
        const double sdy = bn_chunk_sum(part_dy, P, C, c);
        const double sdyx = bn_chunk_sum(part_dyx, P, C, c);
        const double g = (double)gamma[c], n = (double)rows;
        mean_g[c] = (float)__ddiv_rn(__dmul_rn(g, sdy), n);
        mean_gx[c] = (float)__ddiv_rn(__dmul_rn(g, sdyx), n);
        dgamma[c] = (float)sdyx;
        dbeta[c] = (float)sdy;
    }
}

extern "C" __global__ void __launch_bounds__(256)
batch_norm_bwd_apply(const float* __restrict__ dy, const float* __restrict__ xhat,
                     const float* __restrict__ gamma, const float* __restrict__ rstd,
                     const float* __restrict__ mean_g, const float* __restrict__ mean_gx,
                     float* __restrict__ dx, long long n, int C) {
    CG_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const float g = __fmul_rn(dy[e], gamma[c]);
        const float t = __fsub_rn(__fsub_rn(g, mean_g[c]), __fmul_rn(xhat[e], mean_gx[c]));
        dx[e] = __fmul_rn(rstd[c], t);
    }
}

// ---- ReLU, pooling ----

extern "C" __global__ void __launch_bounds__(256) relu_f32(float* __restrict__ x, long long n) {
    CG_GRID_STRIDE(e, n) x[e] = fmaxf(x[e], 0.f);
}

extern "C" __global__ void __launch_bounds__(256)
relu_backward_f32(const float* __restrict__ y, const float* __restrict__ dy,
                  float* __restrict__ dx, long long n) {
    CG_GRID_STRIDE(e, n) dx[e] = y[e] > 0.f ? dy[e] : 0.f;
}

// The output positions o of a k-window/stride-s/pad-p axis whose window holds input index i:
// o·s − p ≤ i < o·s − p + k, 0 ≤ o < n_out; [*lo, *hi) (empty where lo ≥ hi).
__device__ __forceinline__ void cg_windows(int i, int K, int S, int P, int n_out, int* lo,
                                           int* hi) {
    const int top = i + P;               // o·s ≤ top
    const int bottom = top - K + 1;      // o·s ≥ bottom
    *lo = bottom <= 0 ? 0 : (bottom + S - 1) / S;
    *hi = min(n_out, top / S + 1);
}

extern "C" __global__ void __launch_bounds__(256)
max_pool_backward_f32(const float* __restrict__ x, const float* __restrict__ dy,
                      float* __restrict__ dx, int B, int H, int W, int C, int K, int S, int P,
                      int Ho, int Wo) {
    const long long n = (long long)B * H * W * C;
    CG_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const long long r = e / C;
        const int ix = (int)(r % W);
        const long long by = r / W;
        const int iy = (int)(by % H), b = (int)(by / H);
        const float* img = x + (long long)b * H * W * C + c;
        int oy0, oy1, ox0, ox1;
        cg_windows(iy, K, S, P, Ho, &oy0, &oy1);
        cg_windows(ix, K, S, P, Wo, &ox0, &ox1);
        float acc = 0.f;
        for (int oy = oy0; oy < oy1; ++oy) {
            for (int ox = ox0; ox < ox1; ++ox) {
                // The window's argmax by the CPU's rule (first max, a NaN takes over).
                int best = -1;
                float bv = 0.f;
                for (int i = 0; i < K; ++i) {
                    const int ty = oy * S - P + i;
                    if (ty < 0 || ty >= H) continue;
                    for (int j = 0; j < K; ++j) {
                        const int tx = ox * S - P + j;
                        if (tx < 0 || tx >= W) continue;
                        const float v = img[((long long)ty * W + tx) * C];
                        if (best < 0 || v > bv || v != v) {
                            best = ty * W + tx;
                            bv = v;
                        }
                    }
                }
                if (best == iy * W + ix)
                    acc = __fadd_rn(acc, dy[(((long long)b * Ho + oy) * Wo + ox) * C + c]);
            }
        }
        dx[e] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
mean_hw_backward_f32(const float* __restrict__ dy, float* __restrict__ dx, int B, int HW, int C,
                     float scale) {
    const long long n = (long long)B * HW * C;
    CG_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const long long b = e / ((long long)HW * C);
        dx[e] = __fmul_rn(dy[b * C + c], scale);
    }
}

// ---- Convolution ----

extern "C" __global__ void __launch_bounds__(256)
conv_col2im_f32(const float* __restrict__ dcols, float* __restrict__ dx, int B, int H, int W,
                int C, int K, int S, int P, int Ho, int Wo) {
    const long long n = (long long)B * H * W * C;
    const long long row_len = (long long)K * K * C;
    CG_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const long long r = e / C;
        const int ix = (int)(r % W);
        const long long by = r / W;
        const int iy = (int)(by % H), b = (int)(by / H);
        int oy0, oy1, ox0, ox1;
        cg_windows(iy, K, S, P, Ho, &oy0, &oy1);
        cg_windows(ix, K, S, P, Wo, &ox0, &ox1);
        float acc = 0.f;
        for (int oy = oy0; oy < oy1; ++oy) {
            const int i = iy + P - oy * S;
            for (int ox = ox0; ox < ox1; ++ox) {
                const int j = ix + P - ox * S;
                const long long row = ((long long)b * Ho + oy) * Wo + ox;
                acc = __fadd_rn(acc, dcols[row * row_len + (long long)(i * K + j) * C + c]);
            }
        }
        dx[e] = acc;
    }
}

// ---- Optimiser ----

extern "C" __global__ void __launch_bounds__(256)
sgd_momentum_f32(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ buf,
                 long long n, float lr, float momentum, float weight_decay) {
    CG_GRID_STRIDE(e, n) {
        const float p = w[e];
        const float d = __fadd_rn(g[e], __fmul_rn(weight_decay, p));
        const float v = __fadd_rn(__fmul_rn(momentum, buf[e]), d);
        buf[e] = v;
        w[e] = __fsub_rn(p, __fmul_rn(lr, v));
    }
}
