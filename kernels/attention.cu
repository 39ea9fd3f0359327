// Fused multi-head self-attention with an additive bias (BEiT's relative-position bias), one pass
// over the keys with an online softmax (flash-attention style; the N×N scores never reach memory):
//   out[b, i, h, :] = Σ_j softmax_j(scale · q_i·k_j + bias[h, i, j]) · v_j,   scale = Dh^-1/2 usually
// Layout, as the CPU op (src/backend/cpu/attention.rs): the fused qkv activation [B·N, 3·D] with
// D = H·Dh, q | k | v blocks of D columns and head h at columns h·Dh; out [B·N, D], heads
// concatenated. bias [H, N, N] f32, or null. N, H and scale are arguments; Dh is a template
// parameter (64: ViT/BEiT-B/L at patch 16; 80: patch 14 Large-style heads) because the per-lane
// accumulators must be registers. Inputs bf16 or f16; scores, softmax and accumulation f32.
// Written for short sequences (N = 197…257, any N works): plain FMA, no tensor cores yet.
//
// Work split: a block takes BQ = 32 query rows of one (image, head); each of its 8 warps owns
// R = 4 rows. Keys stream through shared memory in tiles of BK = 32 (lane j scores key j of the
// tile against the warp's 4 rows), so K/V are read once per block, not once per row.
// Per tile and row: m' = max(m, max_j s_j); l = l·2^(m−m') + Σ_j 2^(s_j−m'); acc likewise; the
// scores are pre-multiplied by log2(e) so exp2f does the exponentials.
//
// Launch shape: grid = (ceil(N / 32), H, B), block = 256 (8 warps), static smem
//   (32·Dh + 2·32·(Dh+1))·4 bytes (31 KB at Dh = 80), no dynamic smem.
//
// The cuBLAS path's head permutes (src/backend/cuda/attention.rs `forward_batched_*`), so that its
// GEMMs run as ONE strided batch over images × heads (a batch index must map to one stride):
//   attention_split_heads_{f32,bf16}: qkv [B·N, 3, H, Dh] → qkvh [3, B, H, N, Dh]
//   attention_merge_heads_{f32,bf16}: oh [B, H, N, Dh]     → out [B·N, H, Dh]
// and the backward's (src/backend/cuda/attention.rs `backward_batched`), S parts of D columns:
//   attention_split_grad_{f32,bf16}: dout [B·N, S, H, Dh] (f32) → [S, B, H, N, Dh] as f32 or bf16
//   attention_merge_grad_f32:        dqkvh [S, B, H, N, Dh]     → dqkv [B·N, S, H, Dh] (f32)
// Launch shape: grid-stride over the output elements, block 256. Dh is an argument here.
//
// The rest of the cuBLAS backward (dV = Pᵀ dO, dP = dO Vᵀ, dQ = s·dS K, dK = s·dSᵀ Q are cuBLAS):
//   attention_softmax_bwd_f32: dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place over dP [rows, N];
//     one warp per row (lane-strided sums, then a fixed xor-shuffle tree: same bits every run).
//     Launch shape: grid = ceil(rows / W), block = 32·W.
//   dbias = Σ_b dS_b is not here: it is the column-sum family of elementwise.cu (colsum_part /
//     colsum_finish over dS read as [B, H·N·N], groups of 4 images as the CPU adds them).
//   BEiT's relative-position table gradient dtable[r, h] = Σ_{pairs p of row r} dbias[h, p] is
//     elementwise.cu's csr_sum_f32 (strides 1 and N·N), shared with the gathered rows' backward.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define ATT_WARPS 8
#define ATT_R 4
#define ATT_BQ (ATT_WARPS * ATT_R)
#define ATT_BK 32
#define ATT_LOG2E 1.4426950408889634f
// NVRTC has no <cmath>, hence no INFINITY: spell infinity by its bit pattern.
#define NEG_INF_F __int_as_float(0xff800000)

__device__ __forceinline__ float att_in(float v) { return v; }
__device__ __forceinline__ float att_in(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float att_in(__half v) { return __half2float(v); }
__device__ __forceinline__ void att_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void att_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void att_out(__half* p, float v) { *p = __float2half(v); }

template <typename T, int DH>
__device__ void attention_fwd(const T* __restrict__ qkv, const float* __restrict__ bias,
                              T* __restrict__ out, int N, int H, float scale) {
    constexpr int DC = (DH + 31) / 32;  // output columns per lane
    constexpr int KS = DH + 1;          // padded K/V row: lane j reading row j hits bank (j + c) % 32
    __shared__ float qs[ATT_BQ][DH];
    __shared__ float ks[ATT_BK][KS];
    __shared__ float vs[ATT_BK][KS];

    const int D = H * DH;
    const long long rs = 3LL * D;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* base = qkv + (long long)b * N * rs + h * DH;
    const float* bias_h = bias ? bias + (long long)h * N * N : nullptr;

    const float qscale = scale * ATT_LOG2E;
    for (int e = threadIdx.x; e < ATT_BQ * DH; e += blockDim.x) {
        const int r = e / DH, c = e % DH, i = q0 + r;
        qs[r][c] = i < N ? att_in(base[i * rs + c]) * qscale : 0.f;
    }

    float m[ATT_R], l[ATT_R], acc[ATT_R][DC];
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        m[r] = NEG_INF_F;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
    }

    for (int k0 = 0; k0 < N; k0 += ATT_BK) {
        __syncthreads();  // the previous tile is consumed (and, the first time, Q is stored)
        for (int e = threadIdx.x; e < ATT_BK * DH; e += blockDim.x) {
            const int r = e / DH, c = e % DH, j = k0 + r;
            ks[r][c] = j < N ? att_in(base[j * rs + D + c]) : 0.f;
            vs[r][c] = j < N ? att_in(base[j * rs + 2 * D + c]) : 0.f;
        }
        __syncthreads();

        const int j = k0 + lane;
        float s[ATT_R];
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) s[r] = 0.f;
#pragma unroll 8
        for (int c = 0; c < DH; ++c) {
            const float kv = ks[lane][c];
#pragma unroll
            for (int r = 0; r < ATT_R; ++r) s[r] = fmaf(qs[warp * ATT_R + r][c], kv, s[r]);
        }

#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int i = q0 + warp * ATT_R + r;
            float sv = NEG_INF_F;
            if (j < N) sv = s[r] + (bias_h && i < N ? bias_h[(long long)i * N + j] * ATT_LOG2E : 0.f);
            float mt = sv;
            for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            // mt is finite: key k0 (lane 0) is always < N.
            const float mn = fmaxf(m[r], mt);
            const float corr = exp2f(m[r] - mn);  // 0 on the first tile (m = −inf)
            const float p = exp2f(sv - mn);       // 0 for keys past N
            float ps = p;
            for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
            l[r] = l[r] * corr + ps;
            m[r] = mn;
#pragma unroll
            for (int c = 0; c < DC; ++c) acc[r][c] *= corr;
            s[r] = p;
        }

        // acc[r][:] += Σ_j p_rj · v_j, p broadcast from lane j; lane owns columns lane + 32c.
#pragma unroll 4
        for (int jj = 0; jj < ATT_BK; ++jj) {
            float vv[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = lane + 32 * c;
                vv[c] = d < DH ? vs[jj][d] : 0.f;
            }
#pragma unroll
            for (int r = 0; r < ATT_R; ++r) {
                const float p = __shfl_sync(0xffffffffu, s[r], jj);
#pragma unroll
                for (int c = 0; c < DC; ++c) acc[r][c] = fmaf(p, vv[c], acc[r][c]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        const int i = q0 + warp * ATT_R + r;
        if (i >= N) continue;
        const float inv = 1.f / l[r];
        T* o = out + ((long long)b * N + i) * D + h * DH;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = lane + 32 * c;
            if (d < DH) att_out(o + d, acc[r][c] * inv);
        }
    }
}

#define ATT_ENTRY(NAME, T, DH)                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                             \
    NAME(const T* qkv, const float* bias, T* out, int N, int H, float scale) {               \
        attention_fwd<T, DH>(qkv, bias, out, N, H, scale);                                   \
    }

ATT_ENTRY(attention_fwd_bf16_d64, __nv_bfloat16, 64)
ATT_ENTRY(attention_fwd_bf16_d80, __nv_bfloat16, 80)
ATT_ENTRY(attention_fwd_f16_d64, __half, 64)
ATT_ENTRY(attention_fwd_f16_d80, __half, 80)

#define ATT_GRID_STRIDE(e, n)                                                               \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n);           \
         e += (long long)gridDim.x * blockDim.x)

// src [B·N, S, H, Dh] → dst [S, B, H, N, Dh], converted TI → TO (the same type, or f32 → bf16).
template <typename TI, typename TO>
__device__ void attention_split(const TI* __restrict__ src, TO* __restrict__ dst, int S, int B,
                                int N, int H, int Dh) {
    const long long D = (long long)H * Dh, total = (long long)S * B * N * D;
    ATT_GRID_STRIDE(e, total) {
        // e = (((s·B + b)·H + h)·N + i)·Dh + c
        const long long c = e % Dh, i = e / Dh % N, h = e / ((long long)Dh * N) % H;
        const long long b = e / (D * N) % B, s = e / (D * N * B);
        att_out(dst + e, att_in(src[(b * N + i) * S * D + s * D + h * Dh + c]));
    }
}

// src [S, B, H, N, Dh] → dst [B·N, S, H, Dh].
template <typename T>
__device__ void attention_merge(const T* __restrict__ src, T* __restrict__ dst, int S, int B,
                                int N, int H, int Dh) {
    const long long D = (long long)H * Dh, SD = S * D, total = (long long)B * N * SD;
    ATT_GRID_STRIDE(e, total) {
        // e = (b·N + i)·S·D + s·D + h·Dh + c, read from (((s·B + b)·H + h)·N + i)·Dh + c
        const long long c = e % Dh, h = e % D / Dh, s = e % SD / D;
        const long long i = e / SD % N, b = e / (SD * N);
        dst[e] = src[(((s * B + b) * H + h) * N + i) * Dh + c];
    }
}

#define ATT_PERMUTE_ENTRIES(SUFFIX, T)                                                      \
    extern "C" __global__ void __launch_bounds__(256) attention_split_heads_##SUFFIX(        \
        const T* qkv, T* qkvh, int B, int N, int H, int Dh) {                               \
        attention_split<T, T>(qkv, qkvh, 3, B, N, H, Dh);                                   \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) attention_merge_heads_##SUFFIX(        \
        const T* oh, T* out, int B, int N, int H, int Dh) {                                 \
        attention_merge<T>(oh, out, 1, B, N, H, Dh);                                        \
    }

ATT_PERMUTE_ENTRIES(f32, float)
ATT_PERMUTE_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(256)
attention_split_grad_f32(const float* src, float* dst, int S, int B, int N, int H, int Dh) {
    attention_split<float, float>(src, dst, S, B, N, H, Dh);
}

extern "C" __global__ void __launch_bounds__(256)
attention_split_grad_bf16(const float* src, __nv_bfloat16* dst, int S, int B, int N, int H,
                          int Dh) {
    attention_split<float, __nv_bfloat16>(src, dst, S, B, N, H, Dh);
}

extern "C" __global__ void __launch_bounds__(256)
attention_merge_grad_f32(const float* src, float* dst, int S, int B, int N, int H, int Dh) {
    attention_merge<float>(src, dst, S, B, N, H, Dh);
}

extern "C" __global__ void __launch_bounds__(1024)
attention_softmax_bwd_f32(const float* __restrict__ p, float* __restrict__ dp, long long rows,
                          int N) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* pr = p + row * N;
    float* gr = dp + row * N;
    float dot = 0.f;
    for (int j = lane; j < N; j += 32) dot = fmaf(pr[j], gr[j], dot);
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    for (int j = lane; j < N; j += 32) gr[j] = pr[j] * (gr[j] - dot);
}
