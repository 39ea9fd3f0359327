// Patch embedding = Conv2d(C→D, kernel P, stride P) as im2col + GEMM; this is the im2col half:
//   images [B, C, Hh, W] (f32) → cols [B·G, C·P·P],  G = (Hh/P)·(W/P) patches,
//   cols[b·G + gy·(W/P) + gx, ch·P·P + i·P + j] = images[b, ch, gy·P + i, gx·P + j]
// Patches in row-major grid order (gy outer, gx inner, as PyTorch's flatten(2)); the column order
// matches the conv weight [D, C, P, P] flattened to [D, C·P·P], so the GEMM uses it in place.
// Same semantics as src/backend/cpu/patch_embed.rs; pixels beyond the last whole patch are dropped.
// B, C, Hh, W, P are arguments. The bf16 variant feeds a bf16 GEMM directly.
//
// Launch shape: one thread per element of cols (consecutive threads write consecutive columns,
// reads are runs of P contiguous pixels): grid-stride, block = 256,
//   grid = min(ceil(B·G·C·P·P / 256), 8 · SMs).
//
// col2im_f32 is its adjoint, for input gradients (ODIN's perturbation): cols [B·G, C·P·P] (f32) →
// images [B, C, Hh, W], each pixel of a whole patch gets its one value (patches do not overlap,
// so there is nothing to add and no write conflict) and pixels past the last whole patch get 0.
// Launch shape: one thread per image element (consecutive threads write consecutive pixels),
//   grid-stride, block = 256.

#include <cuda_bf16.h>

__device__ __forceinline__ void pe_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void pe_store(__nv_bfloat16* p, long long i, float v) {
    p[i] = __float2bfloat16(v);
}

template <typename T>
__device__ void im2col(const float* __restrict__ images, T* __restrict__ cols, int B, int C,
                       int Hh, int W, int P) {
    const int gw = W / P, g = (Hh / P) * gw;
    const int k = C * P * P;
    const long long n = (long long)B * g * k;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long row = e / k;
        const int col = (int)(e - row * k);
        const int img = (int)(row / g), cell = (int)(row - (long long)img * g);
        const int gy = cell / gw, gx = cell - gy * gw;
        const int ch = col / (P * P), rem = col - ch * P * P;
        const int i = rem / P, j = rem - i * P;
        const long long src = (((long long)img * C + ch) * Hh + gy * P + i) * W + gx * P + j;
        pe_store(cols, e, images[src]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
im2col_f32(const float* images, float* cols, int B, int C, int Hh, int W, int P) {
    im2col<float>(images, cols, B, C, Hh, W, P);
}

extern "C" __global__ void __launch_bounds__(256)
im2col_bf16(const float* images, __nv_bfloat16* cols, int B, int C, int Hh, int W, int P) {
    im2col<__nv_bfloat16>(images, cols, B, C, Hh, W, P);
}

extern "C" __global__ void __launch_bounds__(256)
col2im_f32(const float* __restrict__ cols, float* __restrict__ images, int B, int C, int Hh,
           int W, int P) {
    const int gw = W / P, gh = Hh / P, g = gh * gw;
    const int k = C * P * P;
    const long long n = (long long)B * C * Hh * W;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int x = (int)(e % W), y = (int)(e / W % Hh);
        const long long plane = e / ((long long)W * Hh);
        const int ch = (int)(plane % C), img = (int)(plane / C);
        const int gy = y / P, gx = x / P;
        float v = 0.f;
        if (gy < gh && gx < gw) {
            const long long row = (long long)img * g + gy * gw + gx;
            v = cols[row * k + ch * P * P + (y - gy * P) * P + (x - gx * P)];
        }
        images[e] = v;
    }
}
