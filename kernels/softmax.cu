// Row softmax of x [M, N] with a scale, in place or out of place:
//   y[i, j] = exp(s·x[i, j] − m_i) / Σ_j' exp(s·x[i, j'] − m_i),   m_i = max_j s·x[i, j]
// N and s are arguments (s = 1 for a plain softmax). The max and the sum are taken in one online
// pass (running max, sum rescaled when the max grows), then a second pass writes y.
// A row whose entries are all −inf gives NaN, as torch.softmax does.
//
// Launch shape: one warp per row; W warps per block (4 suggested):
//   grid = ceil(M / W), block = 32·W, no dynamic smem.

// NVRTC has no <cmath>, hence no INFINITY: spell infinity by its bit pattern.
#define NEG_INF_F __int_as_float(0xff800000)

__device__ __forceinline__ void sm_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    // exp(−inf − (−inf)) would be NaN: a side that has seen nothing contributes nothing.
    const float a = (m == NEG_INF_F) ? 0.f : s * expf(m - mn);
    const float b = (m2 == NEG_INF_F) ? 0.f : s2 * expf(m2 - mn);
    m = mn;
    s = a + b;
}

extern "C" __global__ void __launch_bounds__(1024)
softmax_rows_f32(const float* x, float* y, int M, int N, float scale) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    const float* xr = x + (long long)row * N;
    float* yr = y + (long long)row * N;
    float m = NEG_INF_F, s = 0.f;
    for (int j = lane; j < N; j += 32) sm_merge(m, s, scale * xr[j], 1.f);
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        sm_merge(m, s, m2, s2);
    }
    const float inv = 1.f / s;
    for (int j = lane; j < N; j += 32) yr[j] = expf(scale * xr[j] - m) * inv;
}
