// LayerNorm over the last dimension of x [M, D], as torch.nn.LayerNorm (biased variance):
//   mean = Σx / D,  var = Σ(x − mean)² / D,  rstd = 1 / sqrt(var + eps),
//   y = (x − mean) · rstd · γ + β                                  (γ, β: [D], f32)
// Backward, with x̂ = (x − mean)·rstd and g = dy ⊙ γ:
//   dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)),  dγ = Σ_rows dy ⊙ x̂,  dβ = Σ_rows dy.
// Variance is two-pass (centred), never E[x²] − E[x]², which cancels when |mean| ≫ std.
// eps and D are arguments: BEiT uses 1e-6, other models 1e-5. f32 accumulation throughout.
//
// Fused with what comes before it in a pre-norm block (fewer passes over memory):
//   layernorm_fwd_f32_bf16:     x f32 → y bf16: the LayerNorm of the f32 residual stream written
//                               straight as the next GEMM's bf16 input (timm's autocast also
//                               normalises the f32 residual, not a bf16-rounded copy).
//   residual_layernorm_{f32,bf16}: x += ls ⊙ y (the branch output y, f32 or bf16; ls: BEiT's
//                               layer scale [D] or null for 1), then h = LN(x)·γ + β stored as y's
//                               type. x stays f32 and is written back.
//
// Launch shapes (W = warps per block, 4 suggested; one warp owns one row):
//   layernorm_fwd_{f32,bf16,f32_bf16}, residual_layernorm_{f32,bf16}: grid = ceil(M / W),
//     block = 32·W, no dynamic smem. mean, rstd [M] may be null; when given they are saved for
//     the backward.
//   layernorm_bwd_{f32,bf16}:  grid = P (any, e.g. 2·SMs), block = 32·W,
//     dynamic smem = W · 2 · D · 4 bytes. Writes dx [M, D] and per-block partial sums
//     dgamma_part, dbeta_part [P, D] (fixed order, so the result is deterministic).
//   layernorm_bwd_reduce:      grid = ceil(D / 256), block = 256: dγ, dβ [D] = Σ over P partials.

#include <cuda_bf16.h>

__device__ __forceinline__ float ln_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float ln_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ln_load(const __nv_bfloat16* p, long long i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void ln_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void ln_store(__nv_bfloat16* p, long long i, float v) {
    p[i] = __float2bfloat16(v);
}

template <typename TI, typename TO>
__device__ void layernorm_fwd(const TI* __restrict__ x, const float* __restrict__ gamma,
                              const float* __restrict__ beta, TO* __restrict__ y,
                              float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              int M, int D, float eps) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= M) return;
    const long long base = (long long)row * D;
    float s = 0.f;
    for (int i = lane; i < D; i += 32) s += ln_load(x, base + i);
    const float mean = ln_warp_sum(s) / D;
    // Second pass re-reads the row: it is in L1, and a centred sum keeps precision.
    float s2 = 0.f;
    for (int i = lane; i < D; i += 32) {
        const float c = ln_load(x, base + i) - mean;
        s2 += c * c;
    }
    const float rstd = rsqrtf(ln_warp_sum(s2) / D + eps);
    for (int i = lane; i < D; i += 32) {
        const float v = (ln_load(x, base + i) - mean) * rstd;
        ln_store(y, base + i, v * gamma[i] + beta[i]);
    }
    if (lane == 0) {
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
    }
}

template <typename T>
__device__ void layernorm_bwd(const T* __restrict__ x, const float* __restrict__ gamma,
                              const float* __restrict__ mean, const float* __restrict__ rstd,
                              const T* __restrict__ dy, T* __restrict__ dx,
                              float* __restrict__ dgamma_part, float* __restrict__ dbeta_part,
                              int M, int D) {
    extern __shared__ float ln_smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    // Each warp owns its own [2, D] accumulator, and each lane its own columns of it: no atomics.
    float* dg = ln_smem + (size_t)warp * 2 * D;
    float* db = dg + D;
    for (int i = lane; i < D; i += 32) {
        dg[i] = 0.f;
        db[i] = 0.f;
    }
    for (int row = blockIdx.x * warps + warp; row < M; row += gridDim.x * warps) {
        const long long base = (long long)row * D;
        const float mu = mean[row], r = rstd[row];
        float mg = 0.f, mgx = 0.f;
        for (int i = lane; i < D; i += 32) {
            const float d = ln_load(dy, base + i);
            const float xh = (ln_load(x, base + i) - mu) * r;
            const float g = d * gamma[i];
            mg += g;
            mgx += g * xh;
            dg[i] += d * xh;
            db[i] += d;
        }
        mg = ln_warp_sum(mg) / D;
        mgx = ln_warp_sum(mgx) / D;
        for (int i = lane; i < D; i += 32) {
            const float d = ln_load(dy, base + i);
            const float xh = (ln_load(x, base + i) - mu) * r;
            ln_store(dx, base + i, r * (d * gamma[i] - mg - xh * mgx));
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float a = 0.f, b = 0.f;
        for (int w = 0; w < warps; ++w) {
            a += ln_smem[(size_t)w * 2 * D + i];
            b += ln_smem[(size_t)w * 2 * D + D + i];
        }
        dgamma_part[(size_t)blockIdx.x * D + i] = a;
        dbeta_part[(size_t)blockIdx.x * D + i] = b;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
layernorm_fwd_f32(const float* x, const float* gamma, const float* beta, float* y,
                  float* mean_out, float* rstd_out, int M, int D, float eps) {
    layernorm_fwd<float, float>(x, gamma, beta, y, mean_out, rstd_out, M, D, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
layernorm_fwd_bf16(const __nv_bfloat16* x, const float* gamma, const float* beta,
                   __nv_bfloat16* y, float* mean_out, float* rstd_out, int M, int D, float eps) {
    layernorm_fwd<__nv_bfloat16, __nv_bfloat16>(x, gamma, beta, y, mean_out, rstd_out, M, D, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
layernorm_fwd_f32_bf16(const float* x, const float* gamma, const float* beta, __nv_bfloat16* y,
                       float* mean_out, float* rstd_out, int M, int D, float eps) {
    layernorm_fwd<float, __nv_bfloat16>(x, gamma, beta, y, mean_out, rstd_out, M, D, eps);
}

// x += ls ⊙ y row by row, then the LayerNorm of the updated row. Each lane re-reads only the
// columns it wrote itself (i ≡ lane mod 32), so no barrier is needed between the passes.
template <typename T>
__device__ void residual_layernorm(float* __restrict__ x, const T* __restrict__ y,
                                   const float* __restrict__ ls, const float* __restrict__ gamma,
                                   const float* __restrict__ beta, T* __restrict__ h,
                                   float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                   int M, int D, float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    const long long base = (long long)row * D;
    float s = 0.f;
    for (int i = lane; i < D; i += 32) {
        const float v = x[base + i] + (ls ? ls[i] : 1.f) * ln_load(y, base + i);
        x[base + i] = v;
        s += v;
    }
    const float mean = ln_warp_sum(s) / D;
    float s2 = 0.f;
    for (int i = lane; i < D; i += 32) {
        const float c = x[base + i] - mean;
        s2 += c * c;
    }
    const float rstd = rsqrtf(ln_warp_sum(s2) / D + eps);
    for (int i = lane; i < D; i += 32)
        ln_store(h, base + i, (x[base + i] - mean) * rstd * gamma[i] + beta[i]);
    if (lane == 0) {
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
residual_layernorm_f32(float* x, const float* y, const float* ls, const float* gamma,
                       const float* beta, float* h, float* mean_out, float* rstd_out, int M, int D,
                       float eps) {
    residual_layernorm<float>(x, y, ls, gamma, beta, h, mean_out, rstd_out, M, D, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
residual_layernorm_bf16(float* x, const __nv_bfloat16* y, const float* ls, const float* gamma,
                        const float* beta, __nv_bfloat16* h, float* mean_out, float* rstd_out,
                        int M, int D, float eps) {
    residual_layernorm<__nv_bfloat16>(x, y, ls, gamma, beta, h, mean_out, rstd_out, M, D, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
layernorm_bwd_f32(const float* x, const float* gamma, const float* mean, const float* rstd,
                  const float* dy, float* dx, float* dgamma_part, float* dbeta_part, int M,
                  int D) {
    layernorm_bwd<float>(x, gamma, mean, rstd, dy, dx, dgamma_part, dbeta_part, M, D);
}

extern "C" __global__ void __launch_bounds__(1024)
layernorm_bwd_bf16(const __nv_bfloat16* x, const float* gamma, const float* mean,
                   const float* rstd, const __nv_bfloat16* dy, __nv_bfloat16* dx,
                   float* dgamma_part, float* dbeta_part, int M, int D) {
    layernorm_bwd<__nv_bfloat16>(x, gamma, mean, rstd, dy, dx, dgamma_part, dbeta_part, M, D);
}

extern "C" __global__ void __launch_bounds__(256)
layernorm_bwd_reduce(const float* dgamma_part, const float* dbeta_part, float* dgamma,
                     float* dbeta, int P, int D) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D) return;
    float a = 0.f, b = 0.f;
    for (int p = 0; p < P; ++p) {
        a += dgamma_part[(size_t)p * D + i];
        b += dbeta_part[(size_t)p * D + i];
    }
    dgamma[i] = a;
    dbeta[i] = b;
}
