// BEiT's dense relative-position bias gathered from its table, as src/model/relpos.rs gather_bias:
//   out[h, p] = table[index[p], h],   p = i·N + j over the N×N (query, key) pairs, h < H,
// table [R, H] f32 (R = (2Wh−1)(2Ww−1) + 3 rows, one column per head), index [N·N] int32 (table
// rows, checked < R on the host), out [H, N, N] f32. A copy: the result is bit-identical to the
// CPU gather. Training runs it after every optimiser step, so the bias follows the updated table
// without a trip through the host.
//
// Launch shape: grid-stride over the H·N·N outputs, block = 256 (CudaDevice::grid_stride); a thread
// writes consecutive p of one head, so the writes coalesce and the index is read coalesced too.

extern "C" __global__ void relpos_gather_f32(const float* __restrict__ table,
                                             const int* __restrict__ index,
                                             float* __restrict__ out, int heads, int nn) {
    const long long total = (long long)heads * nn;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)gridDim.x * blockDim.x) {
        const int h = (int)(o / nn);
        const int p = (int)(o - (long long)h * nn);
        out[o] = table[(long long)index[p] * heads + h];
    }
}
