// GroupNorm on NHWC activations x [B, HW, C] (BiT's ResNet-v2), as src/backend/cpu/groupnorm.rs:
// for image b and group g (channels g·C/G .. (g+1)·C/G, n = HW·C/G values)
//   mean = Σx / n,  var = Σ(x − mean)² / n  (biased, two-pass: centred, never E[x²] − E[x]²),
//   rstd = 1 / sqrt(var + eps),  sc = γ[c]·rstd,  y = x·sc + (β[c] − mean·sc),  then ReLU if asked.
// γ, β [C] f32; x and y in T (f32 or bf16 storage), every sum in f32. B, HW, C, G, eps are
// arguments; G divides C.
//
// Launch shape: one block per (group, image): grid = (G, B), block = 256 (exactly: the reduction
// keeps one f32 per warp in a static 8-entry shared array). Each block reads its group three
// times (sum, centred squares, normalise); a pixel's C/G channels are contiguous.

#include <cuda_bf16.h>

__device__ __forceinline__ float gn_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float gn_load(const __nv_bfloat16* p, long long i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void gn_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void gn_store(__nv_bfloat16* p, long long i, float v) {
    p[i] = __float2bfloat16(v);
}

// The block's sum of v, returned to every thread (blockDim.x = 256).
__device__ __forceinline__ float gn_block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < 8; ++w) s += red[w];
    __syncthreads();  // red is reused by the next call
    return s;
}

template <typename T>
__device__ void group_norm(const T* __restrict__ x, const float* __restrict__ gamma,
                           const float* __restrict__ beta, T* __restrict__ y, int HW, int C,
                           int G, float eps, int relu) {
    __shared__ float red[8];
    const int g = blockIdx.x, b = blockIdx.y;
    const int cpg = C / G;
    const long long n = (long long)HW * cpg;
    const long long base = (long long)b * HW * C + (long long)g * cpg;
    float s = 0.f;
    for (long long t = threadIdx.x; t < n; t += blockDim.x) {
        const long long p = t / cpg;
        s += gn_load(x, base + p * C + (t - p * cpg));
    }
    const float mean = gn_block_sum(s, red) / (float)n;
    float s2 = 0.f;
    for (long long t = threadIdx.x; t < n; t += blockDim.x) {
        const long long p = t / cpg;
        const float d = gn_load(x, base + p * C + (t - p * cpg)) - mean;
        s2 += d * d;
    }
    const float var = gn_block_sum(s2, red) / (float)n;
    const float rstd = 1.f / sqrtf(var + eps);
    for (long long t = threadIdx.x; t < n; t += blockDim.x) {
        const long long p = t / cpg;
        const int j = (int)(t - p * cpg), ch = g * cpg + j;
        const long long i = base + p * C + j;
        const float sc = gamma[ch] * rstd;
        float v = gn_load(x, i) * sc + (beta[ch] - mean * sc);
        if (relu) v = fmaxf(v, 0.f);
        gn_store(y, i, v);
    }
}

extern "C" __global__ void __launch_bounds__(256)
group_norm_f32(const float* x, const float* gamma, const float* beta, float* y, int HW, int C,
               int G, float eps, int relu) {
    group_norm<float>(x, gamma, beta, y, HW, C, G, eps, relu);
}

extern "C" __global__ void __launch_bounds__(256)
group_norm_bf16(const __nv_bfloat16* x, const float* gamma, const float* beta, __nv_bfloat16* y,
                int HW, int C, int G, float eps, int relu) {
    group_norm<__nv_bfloat16>(x, gamma, beta, y, HW, C, G, eps, relu);
}
