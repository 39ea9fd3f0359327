// CUDA's device built-ins for kernels/*.cu compiled on the host by the CPU stand-in (mood-cuda-sim).
// The build force-includes this header before each kernel file, so the kernel sources are the
// same text NVRTC compiles for the GPU.
//
// Execution model (cpp/runtime.cpp): every thread of a block is a fiber with its own stack; the
// fibers of one block run on one OS thread and switch only at __syncthreads and at the warp
// collectives (__shfl*_sync, votes, __syncwarp), so barriers and shuffles mean what they mean on a
// GPU. Between two barriers the warps run one after another, each as far as it can, in an order
// that changes with every pass (forward, reverse, seeded shuffle): a missing barrier reads data
// another warp has not written yet, or has already overwritten.
//
// threadIdx and friends are found from the stack pointer: each fiber stack is a kStackSize-aligned
// region whose first bytes hold the fiber's header, so no thread-local lookup is needed.
// __shared__ is `thread_local` (static at block scope): one OS thread runs one block at a time.
// `extern __shared__` arrays are defined per kernel file by the generated registry (build.rs).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include <utility>

#ifdef MOOD_SIM_SCAN
// build.rs preprocesses each kernel file once with these markers to find its entry points.
#define __global__ MOOD_SIM_KERNEL
#define __launch_bounds__(...) MOOD_SIM_BOUNDS(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define warpSize 32
// Kernel sources and headers test this to pick host implementations of what is PTX on the GPU
// (kernels/tensor_core.cuh takes tensor_core_sim.h).
#define MOOD_SIM_HOST 1

struct dim3 {
    unsigned x, y, z;
};
typedef dim3 uint3;

namespace mood_sim {

constexpr uintptr_t kStackSize = uintptr_t(1) << 17;

struct Block;

// The head of a fiber's stack region (see the file comment).
struct Fiber {
    dim3 tid;
    unsigned linear, lane, warp;
    Block* block;
    void* sp;
    int state;
    unsigned collectives;
};

struct Block {
    dim3 idx, dim, grid;
};

inline Fiber* self() {
    uintptr_t sp;
#if defined(__x86_64__)
    asm("mov %%rsp, %0" : "=r"(sp));
#else
    char probe;
    sp = (uintptr_t)&probe;
#endif
    return (Fiber*)(sp & ~(kStackSize - 1));
}

// Runtime entry points (cpp/runtime.cpp).
void barrier();
// Deposits this lane's 8 bytes, waits for every lane of `mask`, returns the 32 deposits (lanes
// outside the mask read as NaN bytes).
const uint64_t* exchange(unsigned mask, uint64_t value, int kind);
unsigned alive_lanes();
// Fails the launch with "kernel NAME: block (x,y,z) thread t: <what>" and ends the calling thread
// (misuse a GPU would fault on or leave undefined, e.g. a misaligned ldmatrix row address).
[[noreturn]] void kernel_error(const char* what);
// A number that differs for every block this OS thread runs, for per-block state kept in
// thread_local storage (a block's address on the stack repeats).
unsigned long long block_serial();

enum Collective { kShfl = 1, kVote = 2, kSyncWarp = 3 };

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace mood_sim

#define threadIdx (mood_sim::self()->tid)
#define blockIdx (mood_sim::self()->block->idx)
#define blockDim (mood_sim::self()->block->dim)
#define gridDim (mood_sim::self()->block->grid)

inline void __syncthreads() { mood_sim::barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    mood_sim::exchange(mask, 0, mood_sim::kSyncWarp);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Shuffles: the source lane as CUDA defines it within segments of `width` lanes; a source outside
// the segment (down/up/xor past its edge) returns the caller's own value.
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const uint64_t* all = mood_sim::exchange(mask, mood_sim::to_bits(v), mood_sim::kShfl);
    const int lane = (int)mood_sim::self()->lane;
    const int base = lane & ~(width - 1);
    return mood_sim::from_bits<T>(all[base + (src & (width - 1))]);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const uint64_t* all = mood_sim::exchange(mask, mood_sim::to_bits(v), mood_sim::kShfl);
    const int lane = (int)mood_sim::self()->lane;
    const int base = lane & ~(width - 1);
    const int src = lane ^ lane_mask;
    return mood_sim::from_bits<T>(all[(src & ~(width - 1)) == base ? src : lane]);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const uint64_t* all = mood_sim::exchange(mask, mood_sim::to_bits(v), mood_sim::kShfl);
    const int lane = (int)mood_sim::self()->lane;
    const int base = lane & ~(width - 1);
    const int src = lane + (int)delta;
    return mood_sim::from_bits<T>(all[src < base + width ? src : lane]);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const uint64_t* all = mood_sim::exchange(mask, mood_sim::to_bits(v), mood_sim::kShfl);
    const int lane = (int)mood_sim::self()->lane;
    const int base = lane & ~(width - 1);
    const int src = lane - (int)delta;
    return mood_sim::from_bits<T>(all[src >= base ? src : lane]);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    const uint64_t* all = mood_sim::exchange(mask, pred != 0, mood_sim::kVote);
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) bits |= (all[l] == 1 ? 1u : 0u) << l;
    return bits;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline unsigned __activemask() { return mood_sim::alive_lanes(); }

// Atomics: real atomics, since blocks run on several OS threads.
#define MOOD_SIM_ATOMIC_INT(T)                                                                \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }       \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }       \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }     \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }       \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }         \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }       \
    inline T atomicCAS(T* p, T cmp, T v) {                                                     \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);    \
        return cmp;                                                                            \
    }                                                                                          \
    inline T atomicMax(T* p, T v) {                                                            \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                          \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED,     \
                                                       __ATOMIC_RELAXED)) {                    \
        }                                                                                      \
        return old;                                                                            \
    }                                                                                          \
    inline T atomicMin(T* p, T v) {                                                            \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                          \
        while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED,     \
                                                       __ATOMIC_RELAXED)) {                    \
        }                                                                                      \
        return old;                                                                            \
    }
MOOD_SIM_ATOMIC_INT(int)
MOOD_SIM_ATOMIC_INT(unsigned)
MOOD_SIM_ATOMIC_INT(unsigned long long)
#undef MOOD_SIM_ATOMIC_INT

template <typename F, typename B>
inline F mood_sim_atomic_float_add(F* p, F v) {
    B old = __atomic_load_n((B*)p, __ATOMIC_RELAXED);
    for (;;) {
        F o;
        memcpy(&o, &old, sizeof(F));
        const F n = o + v;
        B nb;
        memcpy(&nb, &n, sizeof(F));
        if (__atomic_compare_exchange_n((B*)p, &old, nb, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return o;
    }
}
inline float atomicAdd(float* p, float v) { return mood_sim_atomic_float_add<float, uint32_t>(p, v); }
inline double atomicAdd(double* p, double v) {
    return mood_sim_atomic_float_add<double, uint64_t>(p, v);
}

// Bit casts and the math intrinsics the kernels use (host libm, so results may differ from the
// GPU's by an ulp or two, as the parity tolerances allow).
inline float __int_as_float(int i) { return mood_sim::from_bits<float>((uint32_t)i); }
inline float __uint_as_float(unsigned u) { return mood_sim::from_bits<float>(u); }
inline int __float_as_int(float f) { return (int)(uint32_t)mood_sim::to_bits(f); }
inline unsigned __float_as_uint(float f) { return (unsigned)mood_sim::to_bits(f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// bf16 and f16 storage types with round-to-nearest-even conversions, NaN kept NaN.
struct __nv_bfloat16 {
    unsigned short __x;
};
struct __half {
    unsigned short __x;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __half half;

inline float __bfloat162float(__nv_bfloat16 h) {
    return mood_sim::from_bits<float>((uint32_t)h.__x << 16);
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u = (uint32_t)mood_sim::to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

inline float __half2float(__half h) {
    const uint32_t s = (uint32_t)(h.__x & 0x8000u) << 16;
    const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
    if (e == 0x1f) return mood_sim::from_bits<float>(s | 0x7f800000u | (m << 13));
    if (e != 0) return mood_sim::from_bits<float>(s | ((e + 112) << 23) | (m << 13));
    const float mag = (float)m * 5.9604644775390625e-8f;  // subnormal: m · 2^-24
    return s ? -mag : mag;
}
inline __half __float2half(float f) {
    const uint32_t u = (uint32_t)mood_sim::to_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return {(unsigned short)(sign | 0x7e00u)};
    if (a >= 0x477ff000u) return {(unsigned short)(sign | 0x7c00u)};  // rounds to inf
    if (a < 0x38800000u) {                                            // f16 subnormal or zero
        const float mag = mood_sim::from_bits<float>(a);
        // Exact: adding 0.5 (2^-1) puts the f16 subnormal step 2^-24 at the f32 ulp of [0.5, 1).
        const float t = mag + 0.5f;
        return {(unsigned short)(sign | ((uint32_t)mood_sim::to_bits(t) - 0x3f000000u))};
    }
    uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias (−112 << 23) and round to even
    return {(unsigned short)(sign | (r >> 13))};
}
inline __half __float2half_rn(float f) { return __float2half(f); }
