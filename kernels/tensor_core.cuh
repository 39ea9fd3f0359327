// Tensor-core device functions shared by the kernels (not a kernel file: no entry points):
//   tc_mma_bf16    D[16×8] += A[16×16] · B[16×8]      mma.sync.aligned.m16n8k16.row.col.f32.bf16
//   tc_ldsm_x4     four 8×8 b16 tiles from shared memory into A/B fragments    ldmatrix .x4
//   tc_ldsm_x4_t   the same, each tile transposed                              ldmatrix .x4.trans
//   tc_cp_async16  16 bytes global → shared without registers (zero-filled when !valid)
//   tc_cp_commit / tc_cp_wait<N>   close a group of copies / wait until ≤ N groups are in flight
//   tc_pack_bf16   two f32 → one register of two bf16 (lo in the low half), round to nearest even
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", 16-bit types), for lane l with
// g = l / 4 and t = l % 4; register r holds two elements, the lower index in the low half:
//   A (row-major 16×16): a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..]   a[2] = A[g][2t+8..]
//                        a[3] = A[g+8][2t+8..]
//   B (16×8, K × N):     b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C/D (16×8 f32):      c[0..1] = C[g][2t..2t+1] c[2..3] = C[g+8][2t..2t+1]
//   ldmatrix .x4: lane l gives the address of row l % 8 of tile l / 8; register r of lane l gets
//   tile r's row l / 4, columns 2(l % 4)..+1 (with .trans: column l / 4, rows 2(l % 4)..+1).
// The CPU stand-in (tools/cuda-sim) has no PTX: it takes the same functions from
// tensor_core_sim.h, built on its warp exchange, so a kernel using this header runs in CI.
// Launch shape: none (device functions only); ldmatrix/mma need all 32 lanes of the warp.
#pragma once

#include <cuda_bf16.h>

#ifdef MOOD_SIM_HOST
#include "tensor_core_sim.h"
#else

__device__ __forceinline__ void tc_mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned tc_smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void tc_ldsm_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tc_smem_addr(row)));
}

__device__ __forceinline__ void tc_ldsm_x4_t(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tc_smem_addr(row)));
}

// src-size 0 makes the copy write 16 zero bytes and read nothing (tails past N); `src` must
// still be a valid address expression, so callers clamp it. The "memory" clobbers keep the
// compiler from moving plain shared-memory accesses across the copy and its wait.
__device__ __forceinline__ void tc_cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(tc_smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void tc_cp_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void tc_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ unsigned tc_pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

#endif
