// The layout check of tensor_core.cuh (no model op uses it): one warp computes
//   C = A · B,  A [16, 32] row-major bf16,  C [16, 16] f32,
// twice: from Bt [16, 32] (B stored n-major, the nn.Linear weight layout, read with ldmatrix) and
// from B [32, 16] (k-major, read with ldmatrix .trans), all staged through shared memory with
// cp.async. Every fragment comes from the header's functions, so a wrong lane layout in the
// stand-in's mma/ldmatrix, or in the kernels' addressing, shows as a mismatch with a plain matmul
// (tests/cuda_parity/tensor_core.rs).
//
// Launch shape: grid 1, block 32 (one warp), no dynamic smem (2.8 KB static).

#include <cuda_bf16.h>

#include "tensor_core.cuh"

// Row strides in bf16: 16-byte multiples, as ldmatrix and cp.async require.
#define TCP_LDA 40
#define TCP_LDB 24

extern "C" __global__ void __launch_bounds__(32)
tensor_core_mma_bf16(const __nv_bfloat16* a, const __nv_bfloat16* bt, const __nv_bfloat16* b,
                     float* c_bt, float* c_b) {
    __shared__ __align__(16) __nv_bfloat16 a_s[16 * TCP_LDA];
    __shared__ __align__(16) __nv_bfloat16 bts[16 * TCP_LDA];
    __shared__ __align__(16) __nv_bfloat16 bs[32 * TCP_LDB];
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    // 64 chunks of 16 bytes (8 bf16) per matrix, two per lane.
    for (int ch = lane; ch < 64; ch += 32) {
        const int r = ch >> 2, c = (ch & 3) * 8;  // A and Bt: 16 rows of 4 chunks
        tc_cp_async16(a_s + r * TCP_LDA + c, a + r * 32 + c, true);
        tc_cp_async16(bts + r * TCP_LDA + c, bt + r * 32 + c, true);
        const int rb = ch >> 1, cb = (ch & 1) * 8;  // B: 32 rows of 2 chunks
        tc_cp_async16(bs + rb * TCP_LDB + cb, b + rb * 16 + cb, true);
    }
    tc_cp_commit();
    tc_cp_wait<0>();
    __syncwarp();

    // Tile m = lane / 8 of each ldmatrix.x4, row lane % 8 of it.
    const int m = lane >> 3, r8 = lane & 7;
    float acc_bt[2][4] = {}, acc_b[2][4] = {};
    for (int kk = 0; kk < 2; ++kk) {
        unsigned af[4], bf[4], bft[4];
        // A tiles (rows 0-7 | 8-15) × (k 0-7 | 8-15), in the order a[0..3].
        tc_ldsm_x4(af, a_s + ((m & 1) * 8 + r8) * TCP_LDA + kk * 16 + (m >> 1) * 8);
        // Bt tiles: n 0-7 (k 0-7, 8-15), then n 8-15: b[0], b[1] of n-tile 0, then of n-tile 1.
        tc_ldsm_x4(bf, bts + ((m >> 1) * 8 + r8) * TCP_LDA + kk * 16 + (m & 1) * 8);
        // B tiles, transposed: k 0-7 | 8-15 of n 0-7, then of n 8-15: the same order.
        tc_ldsm_x4_t(bft, bs + (kk * 16 + (m & 1) * 8 + r8) * TCP_LDB + (m >> 1) * 8);
        for (int nt = 0; nt < 2; ++nt) {
            const unsigned b1[2] = {bf[2 * nt], bf[2 * nt + 1]};
            const unsigned b2[2] = {bft[2 * nt], bft[2 * nt + 1]};
            tc_mma_bf16(acc_bt[nt], af, b1);
            tc_mma_bf16(acc_b[nt], af, b2);
        }
    }
    for (int nt = 0; nt < 2; ++nt)
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = nt * 8 + 2 * t + (i & 1);
            c_bt[row * 16 + col] = acc_bt[nt][i];
            c_b[row * 16 + col] = acc_b[nt][i];
        }
}
