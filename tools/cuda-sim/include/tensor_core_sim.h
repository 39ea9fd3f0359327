// The CPU stand-in's kernels/tensor_core.cuh: mma.m16n8k16 (bf16 → f32), ldmatrix .x4 (and
// .trans) and cp.async with the PTX ISA's per-lane fragment layouts, so that a kernel written for
// tensor cores runs here unchanged. The layouts are spelled out in tensor_core.cuh.
//
// - mma and ldmatrix are warp collectives: every lane deposits its registers (or its row
//   address) through the runtime's warp exchange, then computes its own part from all 32 — a
//   lane that skips the call, or a warp that diverges, fails as a shuffle would.
// - mma multiplies exactly (a bf16 product fits in f32) and sums in f32 in k order; the tensor
//   core sums the 16 products in an unspecified order, so results may differ in the last bits.
// - cp.async is deferred, as on the GPU: the copy is queued and its destination filled with NaN
//   bytes; the data lands only at the tc_cp_wait that retires its group. A read before the wait
//   (or, by another thread, before the wait and a barrier) sees NaNs instead of stale data.
// - Row addresses must be 16-byte aligned (ldmatrix rows, cp.async both ends): else the launch
//   fails, where a GPU would fault or read the wrong row.
#pragma once
#include <vector>

#include "mood_sim.h"

namespace mood_sim {
namespace tc {

struct Copy {
    void* dst;
    const void* src;
    bool valid;
};

// One thread's cp.async state: copies issued since its last commit, and committed groups in
// order, oldest first.
struct Pending {
    unsigned long long block = 0;
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
};

inline Pending& pending() {
    static thread_local Pending all[1024];
    Fiber* f = self();
    Pending& p = all[f->linear];
    if (p.block != block_serial()) {  // left over from an earlier block: that block is gone
        p.block = block_serial();
        p.open.clear();
        p.groups.clear();
    }
    return p;
}

inline void check_aligned(const void* p, const char* what) {
    if ((uintptr_t)p % 16 != 0) kernel_error(what);
}

// The 32 lanes' values of one 8-byte deposit, copied out at once: the runtime reuses its slot
// two collectives later.
struct Lanes {
    uint64_t v[32];
};
inline Lanes gather(uint64_t mine) {
    Lanes out;
    memcpy(out.v, exchange(0xffffffffu, mine, kShfl), sizeof out.v);
    return out;
}

inline float bf16_at(uint32_t reg, int hi) {
    return from_bits<float>((reg >> (hi ? 16 : 0)) << 16);
}

inline uint16_t u16_at(uint64_t addr, int byte_offset) {
    uint16_t v;
    memcpy(&v, (const char*)(uintptr_t)addr + byte_offset, 2);
    return v;
}

inline void ldsm(unsigned r[4], const void* row, bool trans) {
    check_aligned(row, "ldmatrix row address not 16-byte aligned");
    const Lanes a = gather((uint64_t)(uintptr_t)row);
    const int l = (int)self()->lane, g = l / 4, t = l % 4;
    for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {  // row g of tile m, columns 2t, 2t+1
            lo = u16_at(a.v[m * 8 + g], 4 * t);
            hi = u16_at(a.v[m * 8 + g], 4 * t + 2);
        } else {  // column g of tile m, rows 2t, 2t+1
            lo = u16_at(a.v[m * 8 + 2 * t], 2 * g);
            hi = u16_at(a.v[m * 8 + 2 * t + 1], 2 * g);
        }
        r[m] = (unsigned)lo | ((unsigned)hi << 16);
    }
}

}  // namespace tc
}  // namespace mood_sim

inline void tc_mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    using namespace mood_sim::tc;
    const Lanes a01 = gather((uint64_t)a[0] | ((uint64_t)a[1] << 32));
    const Lanes a23 = gather((uint64_t)a[2] | ((uint64_t)a[3] << 32));
    const Lanes b01 = gather((uint64_t)b[0] | ((uint64_t)b[1] << 32));
    // A[row][k]: lane 4(row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2.
    auto A = [&](int row, int k) {
        const int lane = 4 * (row % 8) + (k % 8) / 2, reg = row / 8 + 2 * (k / 8);
        const uint64_t v = (reg < 2 ? a01 : a23).v[lane];
        return bf16_at((uint32_t)(v >> (32 * (reg % 2))), k % 2);
    };
    // B[k][col]: lane 4 col + (k % 8) / 2, register k / 8, half k % 2.
    auto B = [&](int k, int col) {
        const uint64_t v = b01.v[4 * col + (k % 8) / 2];
        return bf16_at((uint32_t)(v >> (32 * (k / 8))), k % 2);
    };
    const int l = (int)mood_sim::self()->lane, g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc = fmaf(A(row, k), B(k, col), acc);
        c[i] = acc;
    }
}

inline void tc_ldsm_x4(unsigned r[4], const void* row) { mood_sim::tc::ldsm(r, row, false); }
inline void tc_ldsm_x4_t(unsigned r[4], const void* row) { mood_sim::tc::ldsm(r, row, true); }

inline void tc_cp_async16(void* dst, const void* src, bool valid) {
    using namespace mood_sim::tc;
    check_aligned(dst, "cp.async destination not 16-byte aligned");
    if (valid) check_aligned(src, "cp.async source not 16-byte aligned");
    memset(dst, 0xff, 16);  // undefined until the wait: NaN bytes
    pending().open.push_back({dst, src, valid});
}

inline void tc_cp_commit() {
    mood_sim::tc::Pending& p = mood_sim::tc::pending();
    p.groups.push_back(std::move(p.open));
    p.open.clear();
}

template <int N>
inline void tc_cp_wait() {
    mood_sim::tc::Pending& p = mood_sim::tc::pending();
    while (p.groups.size() > (size_t)N) {
        for (const mood_sim::tc::Copy& c : p.groups.front()) {
            if (c.valid)
                memcpy(c.dst, c.src, 16);
            else
                memset(c.dst, 0, 16);
        }
        p.groups.erase(p.groups.begin());
    }
}

inline unsigned tc_pack_bf16(float lo, float hi) {
    return (unsigned)__float2bfloat16(lo).__x | ((unsigned)__float2bfloat16(hi).__x << 16);
}
