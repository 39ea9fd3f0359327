// Fused multi-head self-attention on tensor cores (FlashAttention-2 style), forward:
//   out[b, i, h, :] = Σ_j P_ij v_j,   P_ij = softmax_j(s_ij),   s_ij = scale · q_i·k_j + bias[h, i, j]
//   lse[b, h, i]    = log Σ_j exp(s_ij)          (optional: what the backward needs to rebuild P)
// Same layout and math as kernels/attention.cu and the CPU op (src/backend/cpu/attention.rs):
// fused qkv [B·N, 3·D] bf16 (q | k | v, head h at columns h·64), out [B·N, D] bf16, bias [H, N, N]
// f32 or null, lse [B, H, N] f32 or null. Head dim 64 only (every ViT/BEiT preset at patch 16);
// the launcher sends other head dims to the cuBLAS path.
//
// Work split: a block takes 64 query rows of one (image, head); each of its 4 warps owns 16 rows
// and keeps, in registers, their Q fragments, the 16×64 f32 output accumulator and each row's
// running max m and sum l. Keys stream through shared memory in tiles of 64 (K and V, double
// buffered: tile t+1 is copied with cp.async while tile t is used). Per tile, per warp:
//   S = Q·Kᵀ             32 mma m16n8k16 (bf16 in, f32 out), K fragments by ldmatrix
//   S' = S·scale·log2e + bias·log2e, keys ≥ N → −inf
//   m' = max(m, rowmax S'); P = 2^(S' − m'); l = l·2^(m − m') + rowsum P; O = O·2^(m − m')
//   O += P·V             32 mma, P rounded to bf16 straight from S's accumulator registers (the
//                        C layout of two n-tiles is the A layout of one k-step), V by ldmatrix.trans
// At the end out = O / l. Rows past N are computed on zeros and not written; keys past N are
// zero-filled by cp.async (so V holds no NaN) and masked to −inf.
//
// Launch shape: grid = (ceil(N / 64), H, B), block = 128 (4 warps), dynamic smem 46,080 bytes
//   (Q 64 rows, K and V 2 × 64 rows each, rows padded from 128 to 144 bytes so that the 8 rows
//   one ldmatrix reads fall in distinct banks). qkv must be 16-byte aligned.

#include <cuda_bf16.h>

#include "tensor_core.cuh"

#define FA_WARPS 4
#define FA_BQ 64
#define FA_BK 64
#define FA_DH 64
#define FA_LD 72
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
// NVRTC has no <cmath>, hence no INFINITY: spell infinity by its bit pattern.
#define FA_NEG_INF __int_as_float(0xff800000)

extern __shared__ __align__(16) __nv_bfloat16 fa_smem[];

// cp.async of rows r0..r0+63, columns col..col+63 of this (image, head)'s qkv block into a
// [64][FA_LD] tile: 512 chunks of 16 bytes, 4 per thread. Rows past N are zero-filled (the
// source address is clamped to row 0, which the copy then does not read).
__device__ __forceinline__ void fa_load_tile(__nv_bfloat16* dst, const __nv_bfloat16* base,
                                             long long rs, int r0, int col, int N) {
    for (int c = threadIdx.x; c < 64 * 8; c += FA_WARPS * 32) {
        const int r = c >> 3, ch = (c & 7) * 8, i = r0 + r;
        const bool ok = i < N;
        tc_cp_async16(dst + r * FA_LD + ch, base + (ok ? i : 0) * rs + col + ch, ok);
    }
}

__device__ void flash_attention_fwd(const __nv_bfloat16* __restrict__ qkv,
                                    const float* __restrict__ bias, __nv_bfloat16* __restrict__ out,
                                    float* __restrict__ lse, int N, int H, float scale) {
    __nv_bfloat16* qs = fa_smem;
    __nv_bfloat16* ks = qs + FA_BQ * FA_LD;  // [2][FA_BK][FA_LD]
    __nv_bfloat16* vs = ks + 2 * FA_BK * FA_LD;
    const int D = H * FA_DH;
    const long long rs = 3LL * D;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * FA_BQ;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // ldmatrix.x4: this lane addresses row r8 of tile m.
    const int m4 = lane >> 3, r8 = lane & 7;
    const __nv_bfloat16* base = qkv + (long long)b * N * rs + h * FA_DH;
    const float* bias_h = bias ? bias + (long long)h * N * N : nullptr;
    const int tiles = (N + FA_BK - 1) / FA_BK;
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

    fa_load_tile(qs, base, rs, q0, 0, N);
    fa_load_tile(ks, base, rs, 0, D, N);
    fa_load_tile(vs, base, rs, 0, 2 * D, N);
    tc_cp_commit();

    unsigned qf[4][4];
    float o[8][4], m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[nt][i] = 0.f;
    const float sl2 = scale * FA_LOG2E;

    for (int tile = 0; tile < tiles; ++tile) {
        const int buf = tile & 1, k0 = tile * FA_BK;
        if (tile + 1 < tiles) {  // prefetch the next tile into the other buffer
            fa_load_tile(ks + (buf ^ 1) * FA_BK * FA_LD, base, rs, k0 + FA_BK, D, N);
            fa_load_tile(vs + (buf ^ 1) * FA_BK * FA_LD, base, rs, k0 + FA_BK, 2 * D, N);
            tc_cp_commit();
            tc_cp_wait<1>();
        } else {
            tc_cp_wait<0>();
        }
        __syncthreads();  // this tile (and, the first time, Q) is in shared memory for all warps
        // Warp-uniform skips (mma and ldmatrix are warp-wide): a warp whose 16 rows are all past
        // N computes nothing, and 16-key chunks wholly past N are left out (N = 197: a third fewer mma).
        const int kv = N - k0;
        if (q0 + warp * 16 < N) {
            if (tile == 0) {
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
                    tc_ldsm_x4(qf[kk], qs + (warp * 16 + (m4 & 1) * 8 + r8) * FA_LD + kk * 16 + (m4 >> 1) * 8);
            }
            const __nv_bfloat16* kt = ks + buf * FA_BK * FA_LD;
            const __nv_bfloat16* vt = vs + buf * FA_BK * FA_LD;

            float s[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int p = 0; p < 4; ++p) {  // keys 16p..16p+15: n-tiles 2p and 2p+1
                    if (p * 16 >= kv) continue;  // all past N (the last tile): s stays 0, masked below
                    unsigned kf[4];
                    tc_ldsm_x4(kf, kt + (p * 16 + (m4 >> 1) * 8 + r8) * FA_LD + kk * 16 + (m4 & 1) * 8);
                    const unsigned b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                    tc_mma_bf16(s[2 * p], qf[kk], b0);
                    tc_mma_bf16(s[2 * p + 1], qf[kk], b1);
                }

            // Element i of n-tile nt: row row[i / 2], key k0 + 8nt + 2t + i % 2.
            float mt[2] = {m[0], m[1]};
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = k0 + nt * 8 + 2 * t + (i & 1), r = i >> 1;
                    float v = s[nt][i] * sl2;
                    if (j >= N)
                        v = FA_NEG_INF;
                    else if (bias_h && row[r] < N)
                        v = fmaf(bias_h[(long long)row[r] * N + j], FA_LOG2E, v);
                    s[nt][i] = v;
                    mt[r] = fmaxf(mt[r], v);
                }
            float corr[2], ls[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // The 4 lanes of a quad hold one row's 64 keys between them.
                mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
                mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
                corr[r] = exp2f(m[r] - mt[r]);  // mt is finite (key k0 < N); 0 on the first tile
                m[r] = mt[r];
            }
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float p = exp2f(s[nt][i] - m[i >> 1]);
                    s[nt][i] = p;
                    ls[i >> 1] += p;
                }
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) o[nt][i] *= corr[i >> 1];
            l[0] = l[0] * corr[0] + ls[0];  // per-lane partial sums; the quad adds them at the end
            l[1] = l[1] * corr[1] + ls[1];

#pragma unroll
            for (int kc = 0; kc < 4; ++kc) {  // keys 16kc..16kc+15
                if (kc * 16 >= kv) continue;  // P is 0 there
                const unsigned pa[4] = {tc_pack_bf16(s[2 * kc][0], s[2 * kc][1]),
                                        tc_pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                        tc_pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                        tc_pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
                for (int dp = 0; dp < 4; ++dp) {  // head columns 16dp..16dp+15
                    unsigned vf[4];
                    tc_ldsm_x4_t(vf, vt + (kc * 16 + (m4 & 1) * 8 + r8) * FA_LD + dp * 16 + (m4 >> 1) * 8);
                    const unsigned b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
                    tc_mma_bf16(o[2 * dp], pa, b0);
                    tc_mma_bf16(o[2 * dp + 1], pa, b1);
                }
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= N) continue;
        const float inv = 1.f / l[r];
        __nv_bfloat16* orow = out + ((long long)b * N + row[r]) * D + h * FA_DH;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
            *reinterpret_cast<unsigned*>(orow + nt * 8 + 2 * t) =
                tc_pack_bf16(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
        if (lse && t == 0) lse[((long long)b * H + h) * N + row[r]] = (m[r] + log2f(l[r])) * FA_LN2;
    }
}

extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)
flash_attention_fwd_bf16_d64(const __nv_bfloat16* qkv, const float* bias, __nv_bfloat16* out,
                             float* lse, int N, int H, float scale) {
    flash_attention_fwd(qkv, bias, out, lse, N, H, scale);
}

// ---------------------------------------------------------------------------------------------
// Backward, from the forward's out O and lse (P is rebuilt, never stored), given dO:
//   P_ij = exp(s_ij − lse_i),  δ_i = Σ_d dO_id·O_id  (= Σ_j P_ij·dP_ij),  dP = dO·Vᵀ,
//   dS_ij = P_ij·(dP_ij − δ_i),  dV = Pᵀ·dO,  dK = scale·dSᵀ·Q,  dQ = scale·dS·K,
//   dbias[h] = Σ_b dS  (over the batch).
// Four kernels, none with atomics, so every result is the same bit for bit on every run:
//   flash_attention_bwd_delta_bf16    δ [B, H, N]; grid-stride, block 256
//   flash_attention_bwd_dkdv_bf16_d64 a block per 64 keys of one head and one group of images
//     (grid (ceil(N/64), H, G)); per image it streams Q and dO in tiles of 32 rows (double
//     buffered) and keeps each warp's 16 keys' dK, dV in registers: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ,
//     dV += Pᵀ·dO, dK += dSᵀ·Q, all mma. It owns dbias_part[g, h, :, its keys] and adds each
//     image's dS there in image order. block 128, dynamic smem 36,864 bytes.
//   flash_attention_bwd_dq_bf16_d64   a block per 64 query rows of one (image, head) (grid
//     (ceil(N/64), H, B)); streams K and V in tiles of 32 keys: S = Q·Kᵀ, dP = dO·Vᵀ,
//     dQ += dS·K. block 128, dynamic smem 36,864 bytes.
//   flash_attention_bwd_dbias_reduce  dbias = Σ_g dbias_part[g] in group order; grid-stride.
// dqkv [B·N, 3·D] is f32 and written whole for rows < N (q | k | v gradients, heads at h·64).

extern "C" __global__ void __launch_bounds__(256)
flash_attention_bwd_delta_bf16(const __nv_bfloat16* out, const __nv_bfloat16* dout, float* delta,
                               int B, int N, int H) {
    const long long total = (long long)B * H * N, D = (long long)H * FA_DH;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long i = e % N, h = e / N % H, b = e / ((long long)N * H);
        const long long off = (b * N + i) * D + h * FA_DH;
        float acc = 0.f;
        for (int d = 0; d < FA_DH; ++d)
            acc = fmaf(__bfloat162float(out[off + d]), __bfloat162float(dout[off + d]), acc);
        delta[e] = acc;  // e = (b·H + h)·N + i
    }
}

// cp.async of `rows` rows (r0.., 64 columns each) of a row-major [·, ld] bf16 matrix into a
// [rows][FA_LD] tile; rows past N are zero-filled.
__device__ __forceinline__ void fa_load_rows(__nv_bfloat16* dst, const __nv_bfloat16* base,
                                             long long ld, int r0, int rows, int N) {
    for (int c = threadIdx.x; c < rows * 8; c += FA_WARPS * 32) {
        const int r = c >> 3, ch = (c & 7) * 8, i = r0 + r;
        const bool ok = i < N;
        tc_cp_async16(dst + r * FA_LD + ch, base + (ok ? i : 0) * ld + ch, ok);
    }
}

// The A fragments of a warp's 16 rows × 64 columns of a [·][FA_LD] tile (4 k-steps of 16).
__device__ __forceinline__ void fa_a_frags(unsigned f[4][4], const __nv_bfloat16* tile, int row0) {
    const int lane = threadIdx.x & 31, m4 = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
        tc_ldsm_x4(f[kk], tile + (row0 + (m4 & 1) * 8 + r8) * FA_LD + kk * 16 + (m4 >> 1) * 8);
}

// acc[4][4] (16 × 32) = A (16 × 64, fragments) · Tᵀ for T = 32 rows × 64 columns of a tile
// (B operand read row-wise: n = row of T, k = column).
__device__ __forceinline__ void fa_mma_abt(float acc[4][4], const unsigned a[4][4],
                                           const __nv_bfloat16* tile) {
    const int lane = threadIdx.x & 31, m4 = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            unsigned bf[4];
            tc_ldsm_x4(bf, tile + (p * 16 + (m4 >> 1) * 8 + r8) * FA_LD + kk * 16 + (m4 & 1) * 8);
            const unsigned b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
            tc_mma_bf16(acc[2 * p], a[kk], b0);
            tc_mma_bf16(acc[2 * p + 1], a[kk], b1);
        }
}

// acc[8][4] (16 × 64) += X · T for X = 16 × 32 in C-fragment registers x[4][4] (rounded to bf16)
// and T = 32 rows × 64 columns of a tile (B operand read with .trans: k = row of T, n = column).
__device__ __forceinline__ void fa_mma_ct(float acc[8][4], const float x[4][4],
                                          const __nv_bfloat16* tile) {
    const int lane = threadIdx.x & 31, m4 = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {
        const unsigned a[4] = {tc_pack_bf16(x[2 * kc][0], x[2 * kc][1]),
                               tc_pack_bf16(x[2 * kc][2], x[2 * kc][3]),
                               tc_pack_bf16(x[2 * kc + 1][0], x[2 * kc + 1][1]),
                               tc_pack_bf16(x[2 * kc + 1][2], x[2 * kc + 1][3])};
#pragma unroll
        for (int dp = 0; dp < 4; ++dp) {
            unsigned bf[4];
            tc_ldsm_x4_t(bf, tile + (kc * 16 + (m4 & 1) * 8 + r8) * FA_LD + dp * 16 + (m4 >> 1) * 8);
            const unsigned b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
            tc_mma_bf16(acc[2 * dp], a, b0);
            tc_mma_bf16(acc[2 * dp + 1], a, b1);
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)
flash_attention_bwd_dkdv_bf16_d64(const __nv_bfloat16* qkv, const float* bias,
                                  const __nv_bfloat16* dout, const float* lse, const float* delta,
                                  float* dqkv, float* dbias_part, int B, int N, int H,
                                  int images_per_group, float scale) {
    __nv_bfloat16* ks = fa_smem;              // [64][FA_LD]
    __nv_bfloat16* vs = ks + 64 * FA_LD;      // [64][FA_LD]
    __nv_bfloat16* qs = vs + 64 * FA_LD;      // [2][32][FA_LD]
    __nv_bfloat16* ds = qs + 2 * 32 * FA_LD;  // [2][32][FA_LD] (dO)
    const int D = H * FA_DH;
    const long long rs = 3LL * D;
    const int h = blockIdx.y, k0 = blockIdx.x * 64, grp = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    const float sl2 = scale * FA_LOG2E;
    const float* bias_h = bias ? bias + (long long)h * N * N : nullptr;
    float* part = dbias_part ? dbias_part + ((long long)grp * H + h) * N * N : nullptr;
    const int qtiles = (N + 31) / 32;
    const int b_end = min(B, (grp + 1) * images_per_group);

    for (int b = grp * images_per_group; b < b_end; ++b) {
        const __nv_bfloat16* base = qkv + (long long)b * N * rs + h * FA_DH;
        const __nv_bfloat16* dbase = dout + (long long)b * N * D + h * FA_DH;
        const float* lse_b = lse + ((long long)b * H + h) * N;
        const float* delta_b = delta + ((long long)b * H + h) * N;
        fa_load_rows(ks, base + D, rs, k0, 64, N);
        fa_load_rows(vs, base + 2 * D, rs, k0, 64, N);
        fa_load_rows(qs, base, rs, 0, 32, N);
        fa_load_rows(ds, dbase, D, 0, 32, N);
        tc_cp_commit();
        unsigned kf[4][4], vf[4][4];
        float dk[8][4], dv[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) dk[nt][i] = dv[nt][i] = 0.f;

        for (int qt = 0; qt < qtiles; ++qt) {
            const int buf = qt & 1, q0 = qt * 32;
            if (qt + 1 < qtiles) {
                fa_load_rows(qs + (buf ^ 1) * 32 * FA_LD, base, rs, q0 + 32, 32, N);
                fa_load_rows(ds + (buf ^ 1) * 32 * FA_LD, dbase, D, q0 + 32, 32, N);
                tc_cp_commit();
                tc_cp_wait<1>();
            } else {
                tc_cp_wait<0>();
            }
            __syncthreads();
            // A warp whose 16 keys are all past N only helps load (warp-uniform: mma is warp-wide).
            if (k0 + warp * 16 < N) {
                if (qt == 0) {
                    fa_a_frags(kf, ks, warp * 16);
                    fa_a_frags(vf, vs, warp * 16);
                }
                const __nv_bfloat16* qt_s = qs + buf * 32 * FA_LD;
                const __nv_bfloat16* dt_s = ds + buf * 32 * FA_LD;
                float st[4][4], dpt[4][4];
                fa_mma_abt(st, kf, qt_s);   // Sᵀ (unscaled): 16 keys × 32 queries
                fa_mma_abt(dpt, vf, dt_s);  // dPᵀ
                // Element i of n-tile nt: key key[i / 2], query q0 + 8nt + 2t + i % 2.
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int q = q0 + nt * 8 + 2 * t + (i & 1), kj = key[i >> 1];
                        float p = 0.f, dsv = 0.f;
                        if (q < N && kj < N) {
                            float s = st[nt][i] * sl2 - lse_b[q] * FA_LOG2E;
                            if (bias_h) s = fmaf(bias_h[(long long)q * N + kj], FA_LOG2E, s);
                            p = exp2f(s);
                            dsv = p * (dpt[nt][i] - delta_b[q]);
                            if (part) {
                                float* cell = part + (long long)q * N + kj;
                                *cell = b == grp * images_per_group ? dsv : *cell + dsv;
                            }
                        }
                        st[nt][i] = p;
                        dpt[nt][i] = dsv;
                    }
                fa_mma_ct(dv, st, dt_s);   // dV += Pᵀ·dO
                fa_mma_ct(dk, dpt, qt_s);  // dK += dSᵀ·Q
            }
            __syncthreads();  // every warp is done with this buffer (and, at the end, with K, V)
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (key[r] >= N) continue;
            float* row = dqkv + ((long long)b * N + key[r]) * rs + h * FA_DH;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int c = nt * 8 + 2 * t;
                row[D + c] = dk[nt][2 * r] * scale;
                row[D + c + 1] = dk[nt][2 * r + 1] * scale;
                row[2 * D + c] = dv[nt][2 * r];
                row[2 * D + c + 1] = dv[nt][2 * r + 1];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)
flash_attention_bwd_dq_bf16_d64(const __nv_bfloat16* qkv, const float* bias,
                                const __nv_bfloat16* dout, const float* lse, const float* delta,
                                float* dqkv, int N, int H, float scale) {
    __nv_bfloat16* qs = fa_smem;              // [64][FA_LD]
    __nv_bfloat16* ds = qs + 64 * FA_LD;      // [64][FA_LD] (dO)
    __nv_bfloat16* ks = ds + 64 * FA_LD;      // [2][32][FA_LD]
    __nv_bfloat16* vs = ks + 2 * 32 * FA_LD;  // [2][32][FA_LD]
    const int D = H * FA_DH;
    const long long rs = 3LL * D;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * 64;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    const __nv_bfloat16* base = qkv + (long long)b * N * rs + h * FA_DH;
    const __nv_bfloat16* dbase = dout + (long long)b * N * D + h * FA_DH;
    const float* bias_h = bias ? bias + (long long)h * N * N : nullptr;
    const float sl2 = scale * FA_LOG2E;
    float lse_r[2], delta_r[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool ok = row[r] < N;
        lse_r[r] = ok ? lse[((long long)b * H + h) * N + row[r]] * FA_LOG2E : 0.f;
        delta_r[r] = ok ? delta[((long long)b * H + h) * N + row[r]] : 0.f;
    }
    const int ktiles = (N + 31) / 32;
    fa_load_rows(qs, base, rs, q0, 64, N);
    fa_load_rows(ds, dbase, D, q0, 64, N);
    fa_load_rows(ks, base + D, rs, 0, 32, N);
    fa_load_rows(vs, base + 2 * D, rs, 0, 32, N);
    tc_cp_commit();
    unsigned qf[4][4], df[4][4];
    float dq[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dq[nt][i] = 0.f;

    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1, k0 = kt * 32;
        if (kt + 1 < ktiles) {
            fa_load_rows(ks + (buf ^ 1) * 32 * FA_LD, base + D, rs, k0 + 32, 32, N);
            fa_load_rows(vs + (buf ^ 1) * 32 * FA_LD, base + 2 * D, rs, k0 + 32, 32, N);
            tc_cp_commit();
            tc_cp_wait<1>();
        } else {
            tc_cp_wait<0>();
        }
        __syncthreads();
        // A warp whose 16 rows are all past N only helps load (warp-uniform: mma is warp-wide).
        if (q0 + warp * 16 < N) {
            if (kt == 0) {
                fa_a_frags(qf, qs, warp * 16);
                fa_a_frags(df, ds, warp * 16);
            }
            const __nv_bfloat16* kt_s = ks + buf * 32 * FA_LD;
            float s[4][4], dp[4][4];
            fa_mma_abt(s, qf, kt_s);                 // S (unscaled): 16 queries × 32 keys
            fa_mma_abt(dp, df, vs + buf * 32 * FA_LD);  // dP
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = k0 + nt * 8 + 2 * t + (i & 1), r = i >> 1;
                    float dsv = 0.f;
                    if (j < N && row[r] < N) {
                        float sv = s[nt][i] * sl2 - lse_r[r];
                        if (bias_h) sv = fmaf(bias_h[(long long)row[r] * N + j], FA_LOG2E, sv);
                        dsv = exp2f(sv) * (dp[nt][i] - delta_r[r]);
                    }
                    s[nt][i] = dsv;
                }
            fa_mma_ct(dq, s, kt_s);  // dQ += dS·K
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= N) continue;
        float* o = dqkv + ((long long)b * N + row[r]) * rs + h * FA_DH;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            o[nt * 8 + 2 * t] = dq[nt][2 * r] * scale;
            o[nt * 8 + 2 * t + 1] = dq[nt][2 * r + 1] * scale;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
flash_attention_bwd_dbias_reduce(const float* part, float* dbias, long long len, int groups) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < len;
         e += (long long)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int g = 0; g < groups; ++g) acc += part[(long long)g * len + e];
        dbias[e] = acc;
    }
}
