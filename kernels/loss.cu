// Cross-entropy with label smoothing ε over logits z [B, C], as torch's
// CrossEntropyLoss(label_smoothing=ε) and src/train/loss.rs:
//   q_c = ε/C + (c = y ? 1 − ε : 0),  lse = m + ln Σ_c exp(z_c − m),  m = max_c z_c,
//   loss = (1/B) Σ_rows −Σ_c q_c (z_c − lse),   dz_c = (exp(z_c − lse) − q_c) / B.
// In f64 after the f32 difference z_c − m, as the CPU reference does, so the gradients round to
// the same f32 values; the row sums use a fixed shuffle order and the batch sum runs in row
// order (deterministic). A label outside 0..C gives that row NaN loss and gradients.
//
//   cross_entropy_rows: row_loss [B] (f64) and dz [B, C]
//   cross_entropy_sum:  loss[0] = (f32)(Σ_rows row_loss / B), rows in order
//
// Launch shape: cross_entropy_rows: one warp per row, grid ceil(B / 4), block 128.
//   cross_entropy_sum: grid 1, block 32 (lane 0 adds).

__device__ __forceinline__ double ce_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float ce_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

extern "C" __global__ void __launch_bounds__(128)
cross_entropy_rows(const float* z, const int* labels, int B, int C, float smoothing, float off,
                   float* dz, double* row_loss) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= B) return;
    const long long base = (long long)row * C;
    const int y = labels[row];
    const float nan = __int_as_float(0x7fc00000);
    if (y < 0 || y >= C) {
        for (int c = lane; c < C; c += 32) dz[base + c] = nan;
        if (lane == 0) row_loss[row] = (double)nan;
        return;
    }
    float mx = __int_as_float(0xff800000);
    for (int c = lane; c < C; c += 32) mx = fmaxf(mx, z[base + c]);
    mx = ce_warp_max(mx);
    double s = 0.0;
    for (int c = lane; c < C; c += 32) s += exp((double)(z[base + c] - mx));
    const double lse = (double)mx + log(ce_warp_sum(s));
    const double batch = (double)B;
    double acc = 0.0;
    for (int c = lane; c < C; c += 32) {
        const float q = off + (c == y ? 1.f - smoothing : 0.f);
        acc += (double)q * ((double)z[base + c] - lse);
    }
    acc = ce_warp_sum(acc);
    if (lane == 0) row_loss[row] = -acc;
    // The gradient in a pass of its own: fused with the loss sum above, the f64 division's slow
    // path (a call) ran out of registers and spilled.
    for (int c = lane; c < C; c += 32) {
        const float q = off + (c == y ? 1.f - smoothing : 0.f);
        const double logp = (double)z[base + c] - lse;
        dz[base + c] = (float)((exp(logp) - (double)q) / batch);
    }
}

extern "C" __global__ void __launch_bounds__(32)
cross_entropy_sum(const double* row_loss, int B, float* loss) {
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int i = 0; i < B; ++i) total += row_loss[i];
    loss[0] = (float)(total / (double)B);
}

// Mean squared error of pred against target, both [R, K] (n = R·K values), as
// src/train/mim.rs `mse`:
//   loss = (1/n) Σ (p − t)²,  dp = 2 (p − t) / n,
// the difference in f32 then squared and summed in f64 as the CPU does; row sums in a fixed
// shuffle order, the total in row order (deterministic).
//
//   mse_rows: row_loss [R] (f64) = Σ_k (p − t)², and dp [R, K]
//   mse_sum:  loss[0] = (f32)(Σ_rows row_loss / n), rows in order
//
// Launch shape: mse_rows: one warp per row, grid ceil(R / 4), block 128.
//   mse_sum: grid 1, block 32 (lane 0 adds).

extern "C" __global__ void __launch_bounds__(128)
mse_rows(const float* pred, const float* target, int R, int K, double n, float* dp,
         double* row_loss) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= R) return;
    const long long base = (long long)row * K;
    double acc = 0.0;
    for (int k = lane; k < K; k += 32) {
        const float d = pred[base + k] - target[base + k];
        acc += (double)d * (double)d;
        dp[base + k] = (float)(2.0 * (double)d / n);
    }
    acc = ce_warp_sum(acc);
    if (lane == 0) row_loss[row] = acc;
}

extern "C" __global__ void __launch_bounds__(32)
mse_sum(const double* row_loss, int R, double n, float* loss) {
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int i = 0; i < R; ++i) total += row_loss[i];
    loss[0] = (float)(total / n);
}
