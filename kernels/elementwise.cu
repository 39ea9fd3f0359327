// Element-wise ops over token matrices [M, D] (row-major, D innermost):
//   bias_add:         y = y + b              b: [D]  (the linear epilogue without activation;
//                     cuBLAS' plain GEMM has no bias term)
//   bias_gelu:        y = GELU(y + b)        b: [D]; exact erf GELU as torch.nn.GELU():
//                     GELU(x) = x · Φ(x),  Φ(x) = ½ (1 + erf(x / √2))   (not the tanh approximation)
//   gelu_bwd:         dx = dy · (Φ(x) + x · φ(x)),  φ(x) = exp(−x²/2) / √(2π);  x is the
//                     pre-activation (bias already added)
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
// Launch shape (all kernels): 1-D grid-stride loop over the n = M·D elements,
//   block = 256, grid = min(ceil(n / 256), 8 · SMs) — any grid is correct.

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
