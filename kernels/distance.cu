// Epilogues of the distance-based OOD scores, run after the cuBLAS GEMMs (src/ood/mahalanobis.rs,
// src/ood/knn.rs). All f32; every size is an argument.
//   row_sqnorm:        out[i] = Σ_d x[i, d]²                                   x: [M, D]
//   mahalanobis_min:   score[i] = −max(0, min_c (zz[i] − 2·cross[i, c] + mm[c]))
//                      with z = W·x (whitened), cross = z·m_cᵀ [M, C], zz = ‖z_i‖², mm = ‖m_c‖²:
//                      ‖z − m_c‖² = (x − μ_c)ᵀ Σ⁺ (x − μ_c), so this is −min_c Mahalanobis.
//   sqdist_combine:    d[i, j] = max(0, qq[i] − 2·d[i, j] + tt[j])  in place over the GEMM output
//                      q·tᵀ [M, N] (squared L2 distances; the clamp removes rounding negatives)
//   kth_smallest:      out[i] = the k-th smallest of d[i, :] (k is 1-based), exact
//   topk_smallest:     vals[i, :k], idx[i, :k] = the k smallest of d[i, :] ascending, ties broken
//                      by lower index, so the output is deterministic
// Selection is a 4-pass radix select over the order-preserving u32 image of the floats (8 bits
// per pass, a 256-bin shared histogram), O(N) per row with no sort.
//
// Launch shapes:
//   row_sqnorm, mahalanobis_min: one warp per row, grid = ceil(M / W), block = 32·W.
//   sqdist_combine:              grid-stride over M·N, block = 256, grid = min(ceil(M·N/256), 8·SMs).
//   kth_smallest:                one block per row, grid = M, block = 256, no dynamic smem.
//   topk_smallest:               grid = M, block = 256, dynamic smem = 2·k·4 bytes (k ≤ 4096).

// NVRTC has no <cmath>, hence no INFINITY: spell infinity by its bit pattern.
#define POS_INF_F __int_as_float(0x7f800000)

__device__ __forceinline__ float dist_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(1024)
row_sqnorm_f32(const float* x, float* out, int M, int D) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    const float* xr = x + (long long)row * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s = fmaf(xr[d], xr[d], s);
    s = dist_warp_sum(s);
    if (lane == 0) out[row] = s;
}

extern "C" __global__ void __launch_bounds__(1024)
mahalanobis_min_f32(const float* cross, const float* zz, const float* mm, float* score, int M,
                    int C) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    const float* cr = cross + (long long)row * C;
    const float z = zz[row];
    float best = POS_INF_F;
    for (int c = lane; c < C; c += 32) best = fminf(best, z - 2.f * cr[c] + mm[c]);
    for (int o = 16; o > 0; o >>= 1) best = fminf(best, __shfl_xor_sync(0xffffffffu, best, o));
    if (lane == 0) score[row] = -fmaxf(best, 0.f);
}

extern "C" __global__ void __launch_bounds__(256)
sqdist_combine_f32(float* d, const float* qq, const float* tt, int M, int N) {
    const long long n = (long long)M * N;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long i = e / N;
        const int j = (int)(e - i * N);
        d[e] = fmaxf(qq[i] - 2.f * d[e] + tt[j], 0.f);
    }
}

// Order-preserving map float → u32: negative floats flip all bits, non-negative set the sign bit.
__device__ __forceinline__ unsigned dist_key(float f) {
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float dist_unkey(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The key of the k-th smallest (1-based) element of row[0..N). Every thread of the block calls it
// and gets the same answer. hist: 256 counters, sh: 2 words, both shared.
__device__ unsigned dist_radix_select(const float* __restrict__ row, int N, int k,
                                      unsigned* hist, unsigned* sh) {
    unsigned prefix = 0, mask = 0, kk = (unsigned)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int j = threadIdx.x; j < N; j += blockDim.x) {
            const unsigned key = dist_key(row[j]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // 256 bins: a serial scan by one thread costs less than a block scan's barriers.
            unsigned cum = 0, bin = 0;
            for (; bin < 255; ++bin) {
                if (cum + hist[bin] >= kk) break;
                cum += hist[bin];
            }
            sh[0] = bin;
            sh[1] = kk - cum;
        }
        __syncthreads();
        prefix |= sh[0] << shift;
        mask |= 0xffu << shift;
        kk = sh[1];
        __syncthreads();  // everyone has read sh before the next pass overwrites it
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(256)
kth_smallest_f32(const float* d, int M, int N, int k, float* out) {
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[2];
    const int row = blockIdx.x;
    if (row >= M) return;
    const unsigned key = dist_radix_select(d + (long long)row * N, N, k, hist, sh);
    if (threadIdx.x == 0) out[row] = dist_unkey(key);
}

extern "C" __global__ void __launch_bounds__(256)
topk_smallest_f32(const float* d, int M, int N, int k, float* vals, int* idx) {
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[2];
    __shared__ unsigned lt_base[256], eq_base[256];
    extern __shared__ unsigned topk_smem[];  // [k] keys, then [k] indices
    unsigned* skey = topk_smem;
    int* sidx = (int*)(topk_smem + k);
    const int row = blockIdx.x;
    if (row >= M) return;
    const float* r = d + (long long)row * N;
    const unsigned thr = dist_radix_select(r, N, k, hist, sh);

    // Each thread takes a contiguous chunk so that a prefix sum over threads orders the survivors
    // by index: which of several equal-to-threshold elements are kept is then fixed (lowest index).
    const int chunk = (N + blockDim.x - 1) / blockDim.x;
    const int lo = min(N, (int)threadIdx.x * chunk), hi = min(N, lo + chunk);
    unsigned nlt = 0, neq = 0;
    for (int j = lo; j < hi; ++j) {
        const unsigned key = dist_key(r[j]);
        nlt += key < thr;
        neq += key == thr;
    }
    lt_base[threadIdx.x] = nlt;
    eq_base[threadIdx.x] = neq;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned a = 0, b = 0;
        for (int t = 0; t < (int)blockDim.x; ++t) {
            const unsigned x = lt_base[t], y = eq_base[t];
            lt_base[t] = a;
            eq_base[t] = b;
            a += x;
            b += y;
        }
        sh[0] = a;  // elements strictly below the threshold (< k by construction)
    }
    __syncthreads();
    const unsigned less = sh[0], need = (unsigned)k - less;
    unsigned pl = lt_base[threadIdx.x], pe = eq_base[threadIdx.x];
    for (int j = lo; j < hi; ++j) {
        const unsigned key = dist_key(r[j]);
        if (key < thr) {
            skey[pl] = key;
            sidx[pl++] = j;
        } else if (key == thr) {
            if (pe < need) {
                skey[less + pe] = key;
                sidx[less + pe] = j;
            }
            ++pe;
        }
    }
    __syncthreads();
    // Rank sort of the k survivors by (key, index): k²/256 comparisons, trivial for kNN's k ≤ 100s.
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const unsigned ki = skey[i];
        const int ii = sidx[i];
        int rank = 0;
        for (int j = 0; j < k; ++j) {
            const unsigned kj = skey[j];
            rank += (kj < ki) || (kj == ki && sidx[j] < ii);
        }
        vals[(long long)row * k + rank] = dist_unkey(ki);
        idx[(long long)row * k + rank] = ii;
    }
}
