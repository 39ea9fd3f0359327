//! Launchers of kernels/distance.cu, the epilogues of the distance-based OOD scores after a cuBLAS
//! GEMM (src/ood/mahalanobis.rs, src/ood/knn.rs), all f32:
//!   - squared L2 distances d[i, j] = ‖q_i − t_j‖² = ‖q_i‖² − 2 q_i·t_j + ‖t_j‖² (clamped at 0),
//!   - the Mahalanobis score −min_c ‖z_i − m_c‖² on whitened features,
//!   - the k-th smallest / k smallest (values and indices) of each row (kNN).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use super::matmul;
use crate::error::{Error, Result};

/// The most neighbours `topk_smallest` keeps (its shared memory holds 2·k words).
pub const MAX_TOPK: usize = 4096;

/// out[i] = ‖x_i‖², x [M, D].
pub fn row_sqnorm(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    (m, d): (usize, usize),
) -> Result<()> {
    check_len("row_sqnorm x", x, m * d)?;
    check_len("row_sqnorm out", out, m)?;
    let (mi, di) = (as_i32("M", m)?, as_i32("D", d)?);
    if m == 0 {
        return Ok(());
    }
    let f = dev.function("distance", "row_sqnorm_f32")?;
    // SAFETY: x holds M·D values, out M.
    unsafe {
        launch!(
            dev,
            f,
            "row_sqnorm_f32",
            dev.warp_per_row(m),
            [x, out, &mi, &di]
        )
    }?;
    Ok(())
}

/// score[i] = −max(0, min_c zz[i] − 2·cross[i, c] + mm[c]); cross [M, C], zz [M], mm [C].
pub fn mahalanobis_min(
    dev: &CudaDevice,
    cross: &CudaSlice<f32>,
    zz: &CudaSlice<f32>,
    mm: &CudaSlice<f32>,
    score: &mut CudaSlice<f32>,
    (m, c): (usize, usize),
) -> Result<()> {
    if c == 0 {
        return Err(Error::Cuda("mahalanobis_min: no classes".into()));
    }
    check_len("mahalanobis cross", cross, m * c)?;
    check_len("mahalanobis zz", zz, m)?;
    check_len("mahalanobis mm", mm, c)?;
    check_len("mahalanobis score", score, m)?;
    let (mi, ci) = (as_i32("M", m)?, as_i32("C", c)?);
    if m == 0 {
        return Ok(());
    }
    let f = dev.function("distance", "mahalanobis_min_f32")?;
    // SAFETY: shapes checked above.
    unsafe {
        launch!(
            dev,
            f,
            "mahalanobis_min_f32",
            dev.warp_per_row(m),
            [cross, zz, mm, score, &mi, &ci]
        )
    }?;
    Ok(())
}

/// In place over the GEMM output: d[i, j] = max(0, qq[i] − 2·d[i, j] + tt[j]); d [M, N].
pub fn sqdist_combine(
    dev: &CudaDevice,
    d: &mut CudaSlice<f32>,
    qq: &CudaSlice<f32>,
    tt: &CudaSlice<f32>,
    (m, n): (usize, usize),
) -> Result<()> {
    check_len("sqdist d", d, m * n)?;
    check_len("sqdist qq", qq, m)?;
    check_len("sqdist tt", tt, n)?;
    let (mi, ni) = (as_i32("M", m)?, as_i32("N", n)?);
    if m * n == 0 {
        return Ok(());
    }
    let f = dev.function("distance", "sqdist_combine_f32")?;
    // SAFETY: shapes checked above.
    unsafe {
        launch!(
            dev,
            f,
            "sqdist_combine_f32",
            dev.grid_stride(m * n),
            [d, qq, tt, &mi, &ni]
        )
    }?;
    Ok(())
}

/// Squared L2 distances [M, N] between the rows of q [M, D] and t [N, D]: GEMM, norms, combine.
pub fn sqdist(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    t: &CudaSlice<f32>,
    (m, n, d): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    let mut out = dev.zeros::<f32>(m * n)?;
    matmul::matmul_nt(dev, q, t, &mut out, (m, d, n))?;
    let mut qq = dev.zeros::<f32>(m)?;
    let mut tt = dev.zeros::<f32>(n)?;
    row_sqnorm(dev, q, &mut qq, (m, d))?;
    row_sqnorm(dev, t, &mut tt, (n, d))?;
    sqdist_combine(dev, &mut out, &qq, &tt, (m, n))?;
    Ok(out)
}

/// −min_c ‖z_i − m_c‖² for whitened features z [M, D] and whitened class means [C, D].
pub fn mahalanobis_score(
    dev: &CudaDevice,
    z: &CudaSlice<f32>,
    means: &CudaSlice<f32>,
    (m, c, d): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    let mut cross = dev.zeros::<f32>(m * c)?;
    matmul::matmul_nt(dev, z, means, &mut cross, (m, d, c))?;
    let mut zz = dev.zeros::<f32>(m)?;
    let mut mm = dev.zeros::<f32>(c)?;
    row_sqnorm(dev, z, &mut zz, (m, d))?;
    row_sqnorm(dev, means, &mut mm, (c, d))?;
    let mut score = dev.zeros::<f32>(m)?;
    mahalanobis_min(dev, &cross, &zz, &mm, &mut score, (m, c))?;
    Ok(score)
}

fn check_k(op: &str, k: usize, n: usize) -> Result<()> {
    if k == 0 || k > n {
        return Err(Error::Cuda(format!("{op}: k = {k} must be in 1..={n}")));
    }
    Ok(())
}

fn block_per_row(m: usize, smem: usize) -> Result<LaunchConfig> {
    if m > i32::MAX as usize {
        return Err(Error::Cuda(format!("{m} rows exceed the grid")));
    }
    Ok(LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// out[i] = the k-th smallest (1-based) of d[i, :]; d [M, N].
pub fn kth_smallest(
    dev: &CudaDevice,
    d: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    (m, n): (usize, usize),
    k: usize,
) -> Result<()> {
    check_k("kth_smallest", k, n)?;
    check_len("kth_smallest d", d, m * n)?;
    check_len("kth_smallest out", out, m)?;
    let (mi, ni, ki) = (as_i32("M", m)?, as_i32("N", n)?, as_i32("k", k)?);
    if m == 0 {
        return Ok(());
    }
    let f = dev.function("distance", "kth_smallest_f32")?;
    // SAFETY: one block per row of d [M, N]; out holds M values.
    unsafe {
        launch!(
            dev,
            f,
            "kth_smallest_f32",
            block_per_row(m, 0)?,
            [d, &mi, &ni, &ki, out]
        )
    }?;
    Ok(())
}

/// vals, idx [M, k] = the k smallest of each row of d [M, N], ascending; ties to the lower index.
pub fn topk_smallest(
    dev: &CudaDevice,
    d: &CudaSlice<f32>,
    vals: &mut CudaSlice<f32>,
    idx: &mut CudaSlice<i32>,
    (m, n): (usize, usize),
    k: usize,
) -> Result<()> {
    check_k("topk_smallest", k, n)?;
    if k > MAX_TOPK {
        return Err(Error::Cuda(format!(
            "topk_smallest: k = {k} exceeds {MAX_TOPK}"
        )));
    }
    check_len("topk_smallest d", d, m * n)?;
    check_len("topk_smallest vals", vals, m * k)?;
    check_len("topk_smallest idx", idx, m * k)?;
    let (mi, ni, ki) = (as_i32("M", m)?, as_i32("N", n)?, as_i32("k", k)?);
    if m == 0 {
        return Ok(());
    }
    let f = dev.function("distance", "topk_smallest_f32")?;
    // SAFETY: one block per row; dynamic smem holds k keys and k indices (2·k·4 bytes).
    unsafe {
        launch!(
            dev,
            f,
            "topk_smallest_f32",
            block_per_row(m, 8 * k)?,
            [d, &mi, &ni, &ki, vals, idx]
        )
    }?;
    Ok(())
}
