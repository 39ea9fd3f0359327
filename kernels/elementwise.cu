// Element-wise ops over token matrices [M, D] (row-major, D innermost):
//   bias_add:         y = y + b              b: [D]  (the linear epilogue without activation;
//                     cuBLAS' plain GEMM has no bias term)
//   bias_gelu:        y = GELU(y + b)        b: [D]; exact erf GELU as torch.nn.GELU():
//                     GELU(x) = x · Φ(x),  Φ(x) = ½ (1 + erf(x / √2))   (not the tanh approximation)
//   gelu_bwd:         dx = dy · (Φ(x) + x · φ(x)),  φ(x) = exp(−x²/2) / √(2π);  x is the
//                     pre-activation (bias already added)
//   gelu_bwd_into:    dy ·= Φ(x) + x · φ(x) in place, dy f32 (the tape's gradients), x the
//                     pre-activation in f32 or bf16 (as the forward kept it)
//   residual_scale:   x += γ ⊙ y              γ: [D] (BEiT layer scale), or null for γ = 1
//   assemble_tokens:  x[b·N + t, :] = (t = 0 ? cls : patches[b·G + t − 1, :]) + pos[t, :]
//                     N = G + 1 tokens, the class token first; pos [N, D] or null. f32 only.
//   select_rows:      out[r, :] = src[r] >= 0 ? x[src[r], :] : token[:]   src: [R] i32
//                     (row gathering, and masked image modelling's mask token where src < 0).
//                     f32 only.
//   cast_f32_bf16:    out = bf16(in), round to nearest even
//   cast_f32_f16:     out = f16(in),  round to nearest even
// The sizes M·D and D are arguments. bf16 variants read and write bf16 storage and compute in f32.
//
// Training backward (f32 gradients; every sum runs in a fixed order, no atomics, so two runs give
// the same bits). Column sums are two-stage, as the CPU's reduce::column_sums: a partial sum per
// chunk of R rows (rows added in order; R = 64, the CPU's REDUCE_ROWS, or 4 for the attention
// dbias, the CPU's image groups), then the partials added in chunk order. With the products
// rounded before the add (ew_mul, no FMA contraction) the results are the CPU's bits. This is the
// one column-sum family: linear and patch-embedding bias gradients, dγ, dtoken, attention dbias.
//   colsum_part:      part[p, c] = Σ_{r in chunk p} x[row(r), c]   row(r) = rows ? rows[r] : r
//   colsum_finish:    s = part[0, c] + part[1, c] + ... (in chunk order);
//                     out[c] = accumulate ? out[c] + s : s  (gradient accumulation)
//   residual_bwd:     for x' = x + γ ⊙ (k[r / n] · y): dbranch = dy · γ · k[r / n] (γ, k optional)
//                     and part[p, c] = Σ_{r in chunk p} dy[r, c] · yv[r, c] (dγ's partials, yv the
//                     branch as added, f32 or bf16)
//   scale_rows:       x[r, :] *= k[r / n]                         (drop-path, in place)
//   pool_bwd:         mean over tokens 1..N: dx[b, t, :] = t ≥ 1 ? dy[b, :] · inv : 0, inv = 1/(N−1)
//                     class token:           dx[b, t, :] = t = 0 ? dy[b, :] : 0
//   mask_rows_bwd:    dx[r, :] = mask[r] ? 0 : dy[r, :]          (dtoken: colsum over masked rows)
//   csr_sum:          out[j, c] = Σ_{k = off[j]}^{off[j+1]−1} x[src[k]·s_src + c·s_col], k in order:
//                     the CSR inverse of a map built on the host. Gathered rows' backward
//                     (s_src = D, s_col = 1: dx[j] = Σ_{r : rows[r] = j} dy[r]) and BEiT's
//                     relative-position table gradient (s_src = 1, s_col = N·N over dbias [H, N·N])
//   assemble_bwd:     dpatches[b, t−1, :] = dy[b, t, :] (t ≥ 1); dpos[t, :] = Σ_b dy[b, t, :] in
//                     image order; dcls = dpos[0] (pos may be null)
//   add_assign:       acc += g;   scale: x *= s
//
// Launch shape (all kernels but the column sums): 1-D grid-stride loop over the n = M·D elements,
//   block = 256, grid = min(ceil(n / 256), 8 · SMs) — any grid is correct. assemble_bwd loops
//   over N·D (each thread walks the B images of one (t, c)).
//   colsum_part, residual_bwd: grid (ceil(D / 256), min(P, 65535)), block 256, P = ceil(rows / R);
//   the y dimension strides over the chunks. colsum_finish: grid ceil(D / 256), block 256.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define GRID_STRIDE(i, n)                                                                  \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);          \
         i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}

__device__ __forceinline__ float gelu_erf_grad(float x) {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

extern "C" __global__ void __launch_bounds__(256)
bias_add_f32(float* y, const float* bias, long long n, int D) {
    GRID_STRIDE(i, n) { y[i] += bias[i % D]; }
}

extern "C" __global__ void __launch_bounds__(256)
bias_add_bf16(__nv_bfloat16* y, const float* bias, long long n, int D) {
    GRID_STRIDE(i, n) { y[i] = __float2bfloat16(__bfloat162float(y[i]) + bias[i % D]); }
}

extern "C" __global__ void __launch_bounds__(256)
bias_gelu_f32(float* y, const float* bias, long long n, int D) {
    GRID_STRIDE(i, n) {
        const float b = bias ? bias[i % D] : 0.f;
        y[i] = gelu_erf(y[i] + b);
    }
}

extern "C" __global__ void __launch_bounds__(256)
bias_gelu_bf16(__nv_bfloat16* y, const float* bias, long long n, int D) {
    GRID_STRIDE(i, n) {
        const float b = bias ? bias[i % D] : 0.f;
        y[i] = __float2bfloat16(gelu_erf(__bfloat162float(y[i]) + b));
    }
}

extern "C" __global__ void __launch_bounds__(256)
gelu_bwd_f32(const float* x, const float* dy, float* dx, long long n) {
    GRID_STRIDE(i, n) { dx[i] = dy[i] * gelu_erf_grad(x[i]); }
}

extern "C" __global__ void __launch_bounds__(256)
gelu_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* dy, __nv_bfloat16* dx, long long n) {
    GRID_STRIDE(i, n) {
        const float g = __bfloat162float(dy[i]) * gelu_erf_grad(__bfloat162float(x[i]));
        dx[i] = __float2bfloat16(g);
    }
}

extern "C" __global__ void __launch_bounds__(256)
gelu_bwd_into_f32(const float* x, float* dy, long long n) {
    GRID_STRIDE(i, n) { dy[i] = dy[i] * gelu_erf_grad(x[i]); }
}

extern "C" __global__ void __launch_bounds__(256)
gelu_bwd_into_bf16(const __nv_bfloat16* x, float* dy, long long n) {
    GRID_STRIDE(i, n) { dy[i] = dy[i] * gelu_erf_grad(__bfloat162float(x[i])); }
}

extern "C" __global__ void __launch_bounds__(256)
residual_scale_f32(float* x, const float* y, const float* gamma, long long n, int D) {
    GRID_STRIDE(i, n) {
        const float g = gamma ? gamma[i % D] : 1.f;
        x[i] += g * y[i];
    }
}

extern "C" __global__ void __launch_bounds__(256)
residual_scale_bf16(float* x, const __nv_bfloat16* y, const float* gamma, long long n, int D) {
    // The residual stream stays f32 (it accumulates over every block); only the branch is bf16.
    GRID_STRIDE(i, n) {
        const float g = gamma ? gamma[i % D] : 1.f;
        x[i] += g * __bfloat162float(y[i]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
assemble_tokens_f32(const float* patches, const float* cls, const float* pos, float* x, int B,
                    int N, int D) {
    // One pass instead of a copy per image and a broadcast add: B·N·D is small, launches are not.
    const long long n = (long long)B * N * D;
    GRID_STRIDE(i, n) {
        const long long row = i / D;
        const int c = (int)(i - row * D);
        const int t = (int)(row % N);
        const long long b = row / N;
        float v = t == 0 ? cls[c] : patches[(b * (N - 1) + t - 1) * D + c];
        if (pos) v += pos[(long long)t * D + c];
        x[i] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256)
cast_f32_bf16(const float* in, __nv_bfloat16* out, long long n) {
    GRID_STRIDE(i, n) { out[i] = __float2bfloat16(in[i]); }
}

extern "C" __global__ void __launch_bounds__(256)
cast_f32_f16(const float* in, __half* out, long long n) {
    GRID_STRIDE(i, n) { out[i] = __float2half(in[i]); }
}

extern "C" __global__ void __launch_bounds__(256)
select_rows_f32(const float* x, const int* src, const float* token, float* out, int R, int D) {
    const long long n = (long long)R * D;
    GRID_STRIDE(i, n) {
        const long long r = i / D;
        const int c = (int)(i - r * D);
        const int s = src[r];
        out[i] = s >= 0 ? x[(long long)s * D + c] : token[c];
    }
}

// ---------------------------------------------------------------------------------------------
// Training backward. Products that feed a sum are rounded on their own (no FMA contraction) so
// the partial sums are the CPU reference's, bit for bit; the stand-in compiles without FMA.
#ifdef MOOD_SIM_HOST
__device__ __forceinline__ float ew_mul(float a, float b) { return a * b; }
#else
__device__ __forceinline__ float ew_mul(float a, float b) { return __fmul_rn(a, b); }
#endif

__device__ __forceinline__ float ew_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ew_load(const __nv_bfloat16* p, long long i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void ew_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void ew_store(__nv_bfloat16* p, long long i, float v) {
    p[i] = __float2bfloat16(v);
}

// One thread per (column, chunk): consecutive threads read consecutive columns of a row, so
// every row is one coalesced read, and no two threads ever add into the same value.
extern "C" __global__ void __launch_bounds__(256)
colsum_part_f32(const float* x, const int* rows, float* part, int R, int D, int chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= D) return;
    const int P = (R + chunk - 1) / chunk;
    for (int p = blockIdx.y; p < P; p += gridDim.y) {
        const int end = min(R, (p + 1) * chunk);
        float acc = 0.f;
        for (int r = p * chunk; r < end; ++r) {
            const long long row = rows ? rows[r] : r;
            acc += x[row * D + c];
        }
        part[(long long)p * D + c] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
colsum_finish_f32(const float* part, float* out, int P, int D, int accumulate) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= D) return;
    // Starts from the first partial, not from 0, as the CPU's sum_in_order does.
    float acc = P > 0 ? part[c] : 0.f;
    for (int p = 1; p < P; ++p) acc += part[(long long)p * D + c];
    out[c] = accumulate ? out[c] + acc : acc;
}

template <typename T>
__device__ void residual_bwd(const T* __restrict__ yv, const float* __restrict__ gamma,
                             const float* __restrict__ keep, int n, const float* __restrict__ dy,
                             float* __restrict__ dbranch, float* __restrict__ part, int M, int D,
                             int chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= D) return;
    const int P = (M + chunk - 1) / chunk;
    const float g = gamma ? gamma[c] : 1.f;
    for (int p = blockIdx.y; p < P; p += gridDim.y) {
        const int end = min(M, (p + 1) * chunk);
        float acc = 0.f;
        for (int r = p * chunk; r < end; ++r) {
            const long long i = (long long)r * D + c;
            const float d = dy[i];
            // The CPU's order: (γ · dy), then the drop-path factor.
            float v = gamma ? ew_mul(g, d) : d;
            if (keep) v = ew_mul(v, keep[r / n]);
            dbranch[i] = v;
            if (part) acc += ew_mul(d, ew_load(yv, i));
        }
        if (part) part[(long long)p * D + c] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
residual_bwd_f32(const float* yv, const float* gamma, const float* keep, int n, const float* dy,
                 float* dbranch, float* part, int M, int D, int chunk) {
    residual_bwd<float>(yv, gamma, keep, n, dy, dbranch, part, M, D, chunk);
}

extern "C" __global__ void __launch_bounds__(256)
residual_bwd_bf16(const __nv_bfloat16* yv, const float* gamma, const float* keep, int n,
                  const float* dy, float* dbranch, float* part, int M, int D, int chunk) {
    residual_bwd<__nv_bfloat16>(yv, gamma, keep, n, dy, dbranch, part, M, D, chunk);
}

template <typename T>
__device__ void scale_rows(T* x, const float* keep, long long n, int rows_per_image, int D) {
    GRID_STRIDE(i, n) {
        const long long r = i / D;
        ew_store(x, i, ew_load(x, i) * keep[r / rows_per_image]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
scale_rows_f32(float* x, const float* keep, long long n, int rows_per_image, int D) {
    scale_rows<float>(x, keep, n, rows_per_image, D);
}

extern "C" __global__ void __launch_bounds__(256)
scale_rows_bf16(__nv_bfloat16* x, const float* keep, long long n, int rows_per_image, int D) {
    scale_rows<__nv_bfloat16>(x, keep, n, rows_per_image, D);
}

// mode 0: mean over the patch tokens 1..N (scaled by inv); mode 1: the class token (row 0).
extern "C" __global__ void __launch_bounds__(256)
pool_bwd_f32(const float* dy, float* dx, int B, int N, int D, int mode, float inv) {
    const long long n = (long long)B * N * D;
    GRID_STRIDE(i, n) {
        const long long row = i / D;
        const int c = (int)(i - row * D);
        const int t = (int)(row % N);
        const long long b = row / N;
        const float g = dy[b * D + c];
        dx[i] = mode == 0 ? (t == 0 ? 0.f : g * inv) : (t == 0 ? g : 0.f);
    }
}

extern "C" __global__ void __launch_bounds__(256)
mask_rows_bwd_f32(const float* dy, const unsigned char* mask, float* dx, long long n, int D) {
    GRID_STRIDE(i, n) { dx[i] = mask[i / D] ? 0.f : dy[i]; }
}

extern "C" __global__ void __launch_bounds__(256)
csr_sum_f32(const float* x, const int* off, const int* src, float* out, int M, int D,
            long long s_src, long long s_col) {
    const long long n = (long long)M * D;
    GRID_STRIDE(i, n) {
        const long long j = i / D;
        const int c = (int)(i - j * D);
        // The sources of target j in increasing order: the CPU's scatter-add order, no atomics.
        float acc = 0.f;
        for (int k = off[j]; k < off[j + 1]; ++k) acc += x[(long long)src[k] * s_src + c * s_col];
        out[i] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
assemble_bwd_f32(const float* dy, float* dpatches, float* dcls, float* dpos, int B, int N,
                 int D) {
    // One thread per (token, column) walks the images: dy is read once, the image sum runs in
    // image order, and the copy to dpatches rides along.
    const long long n = (long long)N * D;
    GRID_STRIDE(i, n) {
        const int t = (int)(i / D);
        const int c = (int)(i - (long long)t * D);
        float acc = 0.f;
        for (int b = 0; b < B; ++b) {
            const float v = dy[((long long)b * N + t) * D + c];
            acc += v;
            if (t > 0) dpatches[((long long)b * (N - 1) + t - 1) * D + c] = v;
        }
        if (dpos) dpos[i] = acc;
        if (t == 0) dcls[c] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
add_assign_f32(float* acc, const float* g, long long n) {
    GRID_STRIDE(i, n) { acc[i] += g[i]; }
}

extern "C" __global__ void __launch_bounds__(256)
scale_f32(float* x, float s, long long n) {
    GRID_STRIDE(i, n) { x[i] *= s; }
}
