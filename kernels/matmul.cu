// nn.Linear's bias gradient, the one part of its backward that is not a cuBLAS GEMM:
//   db[j] = Σ_i dy[i, j]   over dy [M, N] (f32), optionally added into db (beta = 1),
// as src/backend/cpu/reduce.rs column_sums. Two passes with a fixed split, so the result is the same
// bits on every run and every GPU (no atomics; the split does not depend on the SM count):
//   column_sums_partial_f32: part[c, j] = Σ of dy[i, j] over the rows i of chunk c
//     (CS_ROWS = 256 rows per chunk). Thread (y, x) of the block sums rows r0 + y, r0 + y + 8, ...
//     of column j0 + x in row order; the 8 row-strided sums are then added in y order.
//   column_sums_reduce_f32: db[j] = (beta ? db[j] : 0) + Σ_c part[c, j] in chunk order.
//
// Launch shape:
//   partial: grid = (ceil(N / 32), ceil(M / 256)), block = 256 (8 warps: warp y, lane x), static
//     smem 8·33·4 B. Each warp reads 32 consecutive floats of a row (coalesced).
//   reduce: grid = ceil(N / 256), block = 256, one thread per column.

#define CS_ROWS 256
#define CS_WARPS 8

extern "C" __global__ void __launch_bounds__(256)
column_sums_partial_f32(const float* __restrict__ dy, float* __restrict__ part, int M, int N) {
    __shared__ float acc[CS_WARPS][33];  // +1: column x of each warp's row in its own bank
    const int x = threadIdx.x & 31, y = threadIdx.x >> 5;
    const int j = blockIdx.x * 32 + x;
    const int r0 = blockIdx.y * CS_ROWS;
    const int r1 = min(M, r0 + CS_ROWS);
    float s = 0.f;
    if (j < N)
        for (int i = r0 + y; i < r1; i += CS_WARPS) s += dy[(long long)i * N + j];
    acc[y][x] = s;
    __syncthreads();
    if (y == 0 && j < N) {
        float t = acc[0][x];
#pragma unroll
        for (int w = 1; w < CS_WARPS; ++w) t += acc[w][x];
        part[(long long)blockIdx.y * N + j] = t;
    }
}

extern "C" __global__ void __launch_bounds__(256)
column_sums_reduce_f32(const float* __restrict__ part, float* __restrict__ db, int chunks, int N,
                       int beta) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= N) return;
    float s = 0.f;
    for (int c = 0; c < chunks; ++c) s += part[(long long)c * N + j];
    db[j] = beta ? db[j] + s : s;
}
