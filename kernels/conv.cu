// 2-D convolution and pooling on NHWC activations [B, H, W, C] (channels innermost), as the CPU
// ops of src/backend/cpu/conv.rs. A convolution is im2col + one cuBLAS GEMM (launcher
// src/backend/cuda/conv.rs) + an epilogue pass. The maps the models keep are f32; T is the GEMM
// operand type (im2col writes the rows as T) or, for the pooling kernels, the storage:
//   nchw_to_nhwc:  y[b, p, c] = x[b, c, p]   (p = y·W + x over the H·W positions; the input images
//                  arrive NCHW, f32, and are stored as T)
//   conv_im2col:   cols[(b·Ho + oy)·Wo + ox, (i·k + j)·C + c] = x[b, oy·s − p + i, ox·s − p + j, c]
//                  or 0 where the tap falls in the zero padding (x f32, cols T: the cast to a bf16
//                  GEMM operand happens here); the column order (i, j, c) is the
//                  weight's [Cout, kh, kw, Cin] (`weight_to_hwc`), so the GEMM reads it in place.
//                  Ho = (H + 2p − k)/s + 1.
//   conv_epilogue: y[r, o] = act((acc[r, o] + bias[o]) + res[r, o]), act = ReLU or identity,
//                  acc the GEMM's f32 output [M, N], bias [N] f32 or null, res [M, N] (T) or null;
//                  added in the CPU's order, one rounding to T at the store.
//   max_pool:      y[b, oy, ox, c] = max over the k×k window at (oy·s − p, ox·s − p); taps in the
//                  padding are skipped (−∞, timm's MaxPool2d) or count as 0 (zero_pad = 1: BiT's
//                  stem pads with zeros before an unpadded max-pool).
//   mean_hw:       y[b, c] = Σ_p x[b, p, c] / (H·W), f32 accumulation, f32 output (the pooled
//                  feature stays f32 whatever the storage, as the ViT's head).
// T is f32 or bf16 (storage only); every sum and comparison is in f32. All sizes are arguments.
//
// Launch shape: every kernel is grid-stride with one thread per output element (consecutive
// threads on consecutive channels, so reads and writes of a pixel's C values coalesce),
//   block = 256, grid = min(ceil(n / 256), 8 · SMs).

#include <cuda_bf16.h>

__device__ __forceinline__ float cv_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float cv_load(const __nv_bfloat16* p, long long i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void cv_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void cv_store(__nv_bfloat16* p, long long i, float v) {
    p[i] = __float2bfloat16(v);
}

#define CV_GRID_STRIDE(e, n)                                                          \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n); \
         e += (long long)gridDim.x * blockDim.x)

template <typename T>
__device__ void nchw_to_nhwc(const float* __restrict__ x, T* __restrict__ y, int B, int C,
                             int HW) {
    const long long n = (long long)B * C * HW;
    CV_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const long long bp = e / C;
        const int p = (int)(bp % HW), b = (int)(bp / HW);
        cv_store(y, e, x[((long long)b * C + c) * HW + p]);
    }
}

template <typename T>
__device__ void conv_im2col(const float* __restrict__ x, T* __restrict__ cols, int B, int H, int W,
                            int C, int K, int S, int P, int Ho, int Wo) {
    const int row_len = K * K * C;
    const long long n = (long long)B * Ho * Wo * row_len;
    CV_GRID_STRIDE(e, n) {
        const long long r = e / row_len;
        const int col = (int)(e - r * row_len);
        const int c = col % C, tap = col / C;
        const int i = tap / K, j = tap - i * K;
        const int ox = (int)(r % Wo);
        const long long by = r / Wo;
        const int oy = (int)(by % Ho), b = (int)(by / Ho);
        const int iy = oy * S - P + i, ix = ox * S - P + j;
        float v = 0.f;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W)
            v = cv_load(x, (((long long)b * H + iy) * W + ix) * C + c);
        cv_store(cols, e, v);
    }
}

template <typename T>
__device__ void conv_epilogue(const float* __restrict__ acc, const float* __restrict__ bias,
                              const T* __restrict__ res, T* __restrict__ y, int M, int N,
                              int relu) {
    const long long n = (long long)M * N;
    CV_GRID_STRIDE(e, n) {
        float v = acc[e];
        if (bias) v += bias[e % N];
        if (res) v += cv_load(res, e);
        if (relu) v = fmaxf(v, 0.f);
        cv_store(y, e, v);
    }
}

template <typename T>
__device__ void max_pool(const T* __restrict__ x, T* __restrict__ y, int B, int H, int W, int C,
                         int K, int S, int P, int Ho, int Wo, int zero_pad) {
    const long long n = (long long)B * Ho * Wo * C;
    CV_GRID_STRIDE(e, n) {
        const int c = (int)(e % C);
        const long long r = e / C;
        const int ox = (int)(r % Wo);
        const long long by = r / Wo;
        const int oy = (int)(by % Ho), b = (int)(by / Ho);
        float m = __int_as_float(0xff800000);  // −∞
        for (int i = 0; i < K; ++i) {
            const int iy = oy * S - P + i;
            for (int j = 0; j < K; ++j) {
                const int ix = ox * S - P + j;
                if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                    m = fmaxf(m, cv_load(x, (((long long)b * H + iy) * W + ix) * C + c));
                else if (zero_pad)
                    m = fmaxf(m, 0.f);
            }
        }
        cv_store(y, e, m);
    }
}

template <typename T>
__device__ void mean_hw(const T* __restrict__ x, float* __restrict__ y, int B, int HW, int C) {
    const long long n = (long long)B * C;
    CV_GRID_STRIDE(e, n) {
        const int c = (int)(e % C), b = (int)(e / C);
        const long long base = (long long)b * HW * C + c;
        float s = 0.f;
        for (int p = 0; p < HW; ++p) s += cv_load(x, base + (long long)p * C);
        y[e] = s / (float)HW;
    }
}

#define CV_ENTRIES(T, SUF)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        nchw_to_nhwc_##SUF(const float* x, T* y, int B, int C, int HW) {                      \
        nchw_to_nhwc<T>(x, y, B, C, HW);                                                      \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        conv_im2col_##SUF(const float* x, T* cols, int B, int H, int W, int C, int K, int S,      \
                          int P, int Ho, int Wo) {                                            \
        conv_im2col<T>(x, cols, B, H, W, C, K, S, P, Ho, Wo);                                 \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        conv_epilogue_##SUF(const float* acc, const float* bias, const T* res, T* y, int M,   \
                            int N, int relu) {                                                \
        conv_epilogue<T>(acc, bias, res, y, M, N, relu);                                      \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        max_pool_##SUF(const T* x, T* y, int B, int H, int W, int C, int K, int S, int P,     \
                       int Ho, int Wo, int zero_pad) {                                        \
        max_pool<T>(x, y, B, H, W, C, K, S, P, Ho, Wo, zero_pad);                             \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        mean_hw_##SUF(const T* x, float* y, int B, int HW, int C) {                           \
        mean_hw<T>(x, y, B, HW, C);                                                           \
    }

CV_ENTRIES(float, f32)
CV_ENTRIES(__nv_bfloat16, bf16)
