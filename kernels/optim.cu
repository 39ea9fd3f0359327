// The optimiser's device half: the gradients' joint squared L2 norm (for clipping) and one
// AdamW step over every parameter in a single launch (a multi-tensor launch: a device table of
// pointers instead of one launch per tensor).
//
//   sq_norm_part:   part[k] = Σ_{i in chunk k} g_t[i]²   in f64 (each f32 square is exact in f64),
//                   per block a fixed tree order
//   sq_norm_finish: per_tensor[t] = Σ of tensor t's chunk partials in chunk order (f64);
//                   total = Σ_t per_tensor[t] in tensor order. No atomics: the same bits every run.
//   adamw_step:     for each tensor t with (decay_t = 1 − lr_t·wd_t, step_t = lr_t / (1 − β1ᵗ)):
//                     g ← g·s (s the clipping factor);  p ← p·decay_t;
//                     m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g·g;
//                     p ← p − step_t·m / (√v / √(1−β2ᵗ) + eps)
//                   torch.optim.AdamW's order, as src/backend/cpu/vecmath.rs adamw_update. Every
//                   operation is rounded on its own (_rn intrinsics: no FMA contraction, IEEE
//                   division and square root whatever the compile flags), so a step gives the
//                   CPU's bits.
//
// Tables (u64, row-major): sq_norm: [T, 2] = (g, len); adamw: [T, 5] = (p, g, m, v, len), with
// coef [T, 2] f32 = (decay_t, step_t). first [T + 1] i32: the first chunk of each tensor (its
// prefix sum of ceil(len / CHUNK)), first[T] = the number of chunks K.
//
// Launch shape: sq_norm_part and adamw_step: grid K (one block per chunk of CHUNK = 16384
//   elements of one tensor), block 256 (sq_norm_part needs exactly 256: its tree is fixed).
//   sq_norm_finish: grid 1, block 256.

#define OPT_CHUNK 16384

#ifdef MOOD_SIM_HOST
// The stand-in compiles for the host without FMA, where plain operators round each step.
__device__ __forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__device__ __forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__device__ __forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__device__ __forceinline__ float __fdiv_rn(float a, float b) { return a / b; }
__device__ __forceinline__ float __fsqrt_rn(float a) { return sqrtf(a); }
#endif

// The tensor that owns chunk k: the last t with first[t] <= k (tensors without elements own no
// chunk, so first[t] == first[t + 1] is skipped over).
__device__ __forceinline__ int opt_owner(const int* first, int T, int k) {
    int lo = 0, hi = T - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (first[mid] <= k) lo = mid; else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(256)
sq_norm_part(const unsigned long long* table, const int* first, int T, double* part) {
    __shared__ double s[256];
    const int k = blockIdx.x;
    const int t = opt_owner(first, T, k);
    const float* g = (const float*)table[2 * t];
    const long long len = (long long)table[2 * t + 1];
    const long long start = (long long)(k - first[t]) * OPT_CHUNK;
    const long long end = min(len, start + OPT_CHUNK);
    double acc = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double v = g[i];
        acc += v * v;
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[k] = s[0];
}

extern "C" __global__ void __launch_bounds__(256)
sq_norm_finish(const double* part, const int* first, int T, double* per_tensor, double* total) {
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        double acc = 0.0;
        for (int k = first[t]; k < first[t + 1]; ++k) acc += part[k];
        per_tensor[t] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = 0.0;
        for (int t = 0; t < T; ++t) acc += per_tensor[t];
        total[0] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
adamw_step(const unsigned long long* table, const float* coef, const int* first, int T,
           float beta1, float beta2, float eps, float sqrt_bc2, float grad_scale) {
    const int k = blockIdx.x;
    const int t = opt_owner(first, T, k);
    float* p = (float*)table[5 * t];
    const float* g = (const float*)table[5 * t + 1];
    float* m = (float*)table[5 * t + 2];
    float* v = (float*)table[5 * t + 3];
    const long long len = (long long)table[5 * t + 4];
    const float decay = coef[2 * t], step = coef[2 * t + 1];
    const float one_b1 = __fsub_rn(1.f, beta1), one_b2 = __fsub_rn(1.f, beta2);
    const long long start = (long long)(k - first[t]) * OPT_CHUNK;
    const long long end = min(len, start + OPT_CHUNK);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = __fmul_rn(g[i], grad_scale);
        const float x = __fmul_rn(p[i], decay);
        const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_b1, gi));
        const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_b2, gi), gi));
        const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), sqrt_bc2), eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = __fsub_rn(x, __fdiv_rn(__fmul_rn(step, mi), den));
    }
}
