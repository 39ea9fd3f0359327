//! Launchers of kernels/elementwise.cu over token matrices [M, D]: the linear epilogues (bias,
//! bias + exact GELU), GELU's backward, the layer-scaled residual x += γ ⊙ y (x stays f32), the
//! token assembly [cls; patches] + pos, and the f32 → bf16/f16 casts. Same math as src/backend/cpu/{elementwise,vecmath}.rs.
//! Then the training backward (column sums, residual with layer scale and drop-path, pooling,
//! masked and gathered rows, token assembly, accumulation), each matching the CPU tape's
//! reference and summing in a fixed order. Two helpers serve the other launcher files too:
//! `column_sums_into`, the one column-sum family (every bias gradient, dγ, dtoken, the attention
//! dbias), and `csr_sum`, the atomics-free scatter-add (gathered rows, BEiT's relative-position
//! table).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, cuda_err, f32_or_bf16, nonempty, CudaDevice};
use super::{ptr_mut_or_null, ptr_or_null, Storage};
use crate::error::{Error, Result};

/// Shared by bias_add and bias_gelu: y [M, D] (in place) with bias [D] (optional for GELU).
fn bias_epilogue<T: Storage>(
    dev: &CudaDevice,
    kernel: &str,
    y: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    (m, d): (usize, usize),
) -> Result<()> {
    f32_or_bf16::<T>(kernel)?;
    check_len(kernel, y, m * d)?;
    if let Some(b) = bias {
        check_len(&format!("{kernel} bias"), b, d)?;
    }
    let n = (m * d) as i64;
    let di = as_i32("D", d.max(1))?;
    if n == 0 {
        return Ok(());
    }
    let name = format!("{kernel}_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    let s = dev.stream();
    let pb = ptr_or_null(s, bias);
    // SAFETY: y holds M·D elements and bias D (or is null where the kernel allows it).
    unsafe { launch!(dev, f, name, dev.grid_stride(n as usize), [y, &pb, &n, &di]) }?;
    Ok(())
}

/// y [M, D] += b [D].
pub fn bias_add<T: Storage>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    bias: &CudaSlice<f32>,
    md: (usize, usize),
) -> Result<()> {
    bias_epilogue(dev, "bias_add", y, Some(bias), md)
}

/// y [M, D] = GELU(y + b), exact erf GELU; no bias when `bias` is None.
pub fn bias_gelu<T: Storage>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    md: (usize, usize),
) -> Result<()> {
    bias_epilogue(dev, "bias_gelu", y, bias, md)
}

/// dx = dy · GELU'(x), x the pre-activation; all [n].
pub fn gelu_backward<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    f32_or_bf16::<T>("gelu_bwd")?;
    let n = x.len();
    check_len("gelu_bwd dy", dy, n)?;
    check_len("gelu_bwd dx", dx, n)?;
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let name = format!("gelu_bwd_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    // SAFETY: all three buffers hold n elements.
    unsafe { launch!(dev, f, name, dev.grid_stride(n), [x, dy, dx, &ni]) }?;
    Ok(())
}

/// dy [n] (f32, in place) ·= GELU'(x), x [n] the pre-activation in T: the tape's form, whose
/// gradients are f32 whatever the forward's precision.
pub fn gelu_backward_into<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    dy: &mut CudaSlice<f32>,
) -> Result<()> {
    f32_or_bf16::<T>("gelu_bwd_into")?;
    let n = x.len();
    check_len("gelu_bwd_into dy", dy, n)?;
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let name = format!("gelu_bwd_into_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    // SAFETY: both buffers hold n elements.
    unsafe { launch!(dev, f, name, dev.grid_stride(n), [x, dy, &ni]) }?;
    Ok(())
}

/// x [M, D] (f32, the residual stream) += γ ⊙ y [M, D]; γ [D] or None for 1.
pub fn residual<T: Storage>(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    y: &CudaSlice<T>,
    gamma: Option<&CudaSlice<f32>>,
    (m, d): (usize, usize),
) -> Result<()> {
    f32_or_bf16::<T>("residual_scale")?;
    check_len("residual x", x, m * d)?;
    check_len("residual y", y, m * d)?;
    if let Some(g) = gamma {
        check_len("layer scale", g, d)?;
    }
    let n = (m * d) as i64;
    let di = as_i32("D", d.max(1))?;
    if n == 0 {
        return Ok(());
    }
    let name = format!("residual_scale_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    let s = dev.stream();
    let pg = ptr_or_null(s, gamma);
    // SAFETY: x and y hold M·D elements, γ D or null.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(n as usize),
            [x, y, &pg, &n, &di]
        )
    }?;
    Ok(())
}

/// out = T(in), round to nearest even; T is bf16 or f16.
pub fn cast<T: Storage>(
    dev: &CudaDevice,
    input: &CudaSlice<f32>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    if T::NAME == "f32" {
        return Err(Error::Cuda("cast: target must be bf16 or f16".into()));
    }
    let n = input.len();
    check_len("cast output", out, n)?;
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let name = format!("cast_f32_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    // SAFETY: both buffers hold n elements.
    unsafe { launch!(dev, f, name, dev.grid_stride(n), [input, out, &ni]) }?;
    Ok(())
}

/// x [B·N, D] = per image [cls; patches_b] (+ pos [N, D]), N = G + 1; patches [B·G, D], cls [D].
pub fn assemble_tokens(
    dev: &CudaDevice,
    patches: &CudaSlice<f32>,
    cls: &CudaSlice<f32>,
    pos: Option<&CudaSlice<f32>>,
    x: &mut CudaSlice<f32>,
    (b, g, d): (usize, usize, usize),
) -> Result<()> {
    let n = g + 1;
    check_len("assemble_tokens patches", patches, b * g * d)?;
    check_len("assemble_tokens cls", cls, d)?;
    if let Some(p) = pos {
        check_len("assemble_tokens pos", p, n * d)?;
    }
    check_len("assemble_tokens x", x, b * n * d)?;
    let (bi, ni, di) = (as_i32("B", b)?, as_i32("N", n)?, as_i32("D", d)?);
    if b * d == 0 {
        return Ok(());
    }
    let f = dev.function("elementwise", "assemble_tokens_f32")?;
    let s = dev.stream();
    let pp = ptr_or_null(s, pos);
    // SAFETY: shapes checked above; pos may be null.
    unsafe {
        launch!(
            dev,
            f,
            "assemble_tokens_f32",
            dev.grid_stride(b * n * d),
            [patches, cls, &pp, x, &bi, &ni, &di]
        )
    }?;
    Ok(())
}

/// out [R, D] = row src[r] of x [M, D], or `token` [D] where src[r] < 0: row gathering and
/// masked image modelling's mask token in one kernel (`cpu::elementwise::{gather_rows, mask_rows}`).
pub fn select_rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    src: &[i32],
    token: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    (m, d): (usize, usize),
) -> Result<()> {
    let r = src.len();
    check_len("select_rows x", x, m * d)?;
    check_len("select_rows out", out, r * d)?;
    if let Some(&bad) = src.iter().find(|&&s| s >= 0 && s as usize >= m) {
        return Err(Error::Data(format!(
            "select_rows: row {bad} out of range for {m} rows"
        )));
    }
    match token {
        Some(t) => check_len("select_rows token", t, d)?,
        None if src.iter().any(|&s| s < 0) => {
            return Err(Error::Data(
                "select_rows: a row asks for the token, but none was given".into(),
            ))
        }
        None => {}
    }
    if r * d == 0 {
        return Ok(());
    }
    let (ri, di) = (as_i32("R", r)?, as_i32("D", d)?);
    let srcd = dev.upload(src)?;
    let f = dev.function("elementwise", "select_rows_f32")?;
    let s = dev.stream();
    let pt = ptr_or_null(s, token);
    // SAFETY: x holds M·D values and every src entry is < M or negative (then token, D values,
    // is read); out holds R·D.
    unsafe {
        launch!(
            dev,
            f,
            "select_rows_f32",
            dev.grid_stride(r * d),
            [x, &srcd, &pt, out, &ri, &di]
        )
    }?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Training backward: the launchers the device tape calls. Gradients are f32 [rows, D] row-major.
// Every sum runs in a fixed order (no atomics): the same inputs give the same bits on every run.

/// Rows per chunk of the two-stage column sums: the CPU's `reduce::REDUCE_ROWS`, so that the
/// partial sums, and their sum in chunk order, are the CPU's own.
pub const SUM_ROWS: usize = crate::backend::cpu::reduce::REDUCE_ROWS;

/// The launch shape of the column kernels: one thread per (column, chunk of rows).
fn column_grid(d: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (d.div_ceil(256) as u32, chunks.clamp(1, 65535) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out [D] = Σ over the P chunk partials part [P, D], added in chunk order (or out += that sum
/// when `accumulate`).
fn colsum_finish(
    dev: &CudaDevice,
    part: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    accumulate: bool,
    (p, d): (usize, usize),
) -> Result<()> {
    let (pi, di, acc) = (as_i32("chunks", p)?, as_i32("D", d)?, i32::from(accumulate));
    let f = dev.function("elementwise", "colsum_finish_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: part holds P·D values (P ≥ 1), out D (the callers check).
    unsafe {
        launch!(
            dev,
            f,
            "colsum_finish_f32",
            cfg,
            [part, out, &pi, &di, &acc]
        )
    }
}

/// The one column-sum family: out [D] = Σ over the rows of x [M, D] (all of them, or the listed
/// ones), or out += that when `accumulate`. Partial sums of `chunk` rows added in row order, then
/// the partials added in chunk order: with `chunk` = SUM_ROWS the CPU's `reduce::column_sums`,
/// with 4 the CPU attention backward's image groups; either way the CPU's bits.
pub(crate) fn column_sums_into(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    rows: Option<&[i32]>,
    chunk: usize,
    out: &mut CudaSlice<f32>,
    accumulate: bool,
    (m, d): (usize, usize),
) -> Result<()> {
    check_len("column sums input", x, m * d)?;
    check_len("column sums output", out, d)?;
    if let Some(&bad) = rows.and_then(|l| l.iter().find(|&&r| r < 0 || r as usize >= m)) {
        return Err(Error::Cuda(format!(
            "column sums: row {bad} out of range for {m} rows"
        )));
    }
    let r = rows.map_or(m, <[i32]>::len);
    if d == 0 {
        return Ok(());
    }
    if r == 0 {
        if !accumulate {
            dev.stream()
                .memset_zeros(out)
                .map_err(cuda_err("zero column sums"))?;
        }
        return Ok(());
    }
    let chunk = chunk.max(1);
    let p = r.div_ceil(chunk);
    let (ri, di, ci) = (as_i32("rows", r)?, as_i32("D", d)?, as_i32("chunk", chunk)?);
    as_i32("M", m)?;
    let mut part = dev.empty::<f32>(p * d)?;
    let list = rows.map(|l| dev.upload(l)).transpose()?;
    let pl = ptr_or_null(dev.stream(), list.as_ref());
    let f = dev.function("elementwise", "colsum_part_f32")?;
    // SAFETY: x holds M·D values and every listed row is in 0..M (checked above); part P·D.
    unsafe {
        launch!(
            dev,
            f,
            "colsum_part_f32",
            column_grid(d, p),
            [x, &pl, &mut part, &ri, &di, &ci]
        )
    }?;
    colsum_finish(dev, &part, out, accumulate, (p, d))
}

/// Column sums of x [M, N]: out [N] = Σ_r x[r, :] (bias, layer-scale, class-token and
/// position-embedding gradients). Two stages, in the CPU's `reduce::column_sums` order (chunks of
/// 64 rows, each added row by row, then the chunks in order), so the result is the CPU's bits.
pub fn sum_rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (m, n): (usize, usize),
) -> Result<CudaSlice<f32>> {
    check_len("sum_rows x", x, m * n)?;
    nonempty("sum_rows (N = 0)", n)?;
    let mut out = dev.empty::<f32>(n)?;
    column_sums_into(dev, x, None, SUM_ROWS, &mut out, false, (m, n))?;
    Ok(out)
}

/// `sum_rows` into a given out [N]: overwritten, or with `accumulate` out += Σ_r x[r, :] (the
/// CPU's `out + reduce::column_sums(x)`, bit for bit): a bias gradient added over micro-batches.
pub fn sum_rows_into(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    accumulate: bool,
    (m, n): (usize, usize),
) -> Result<()> {
    column_sums_into(dev, x, None, SUM_ROWS, out, accumulate, (m, n))
}

/// Backward of the residual x' = x + γ ⊙ (k[r / n] · y) given dy = dx' [M, D] (f32):
/// dbranch [M, D] = dy · γ (· k[r / n] with drop-path), and, with γ, dγ [D] = Σ_rows dy ⊙ yv,
/// where yv [M, D] (f32 or bf16) is the branch as added, already drop-path scaled. `row_scale` =
/// (k [B], n tokens per image), M = B·n. dx = dy itself (identity), not returned. dγ is summed
/// as `sum_rows` (the CPU's `residual_scaled_backward` order).
#[allow(clippy::type_complexity)]
pub fn residual_backward<T: Storage>(
    dev: &CudaDevice,
    yv: &CudaSlice<T>,
    gamma: Option<&CudaSlice<f32>>,
    row_scale: Option<(&CudaSlice<f32>, usize)>,
    dy: &CudaSlice<f32>,
    (m, d): (usize, usize),
) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    f32_or_bf16::<T>("residual_bwd")?;
    check_len("residual_backward yv", yv, m * d)?;
    check_len("residual_backward dy", dy, m * d)?;
    if let Some(g) = gamma {
        check_len("residual_backward layer scale", g, d)?;
    }
    let n = match row_scale {
        Some((keep, n)) => {
            if keep.len() * n != m {
                return Err(Error::Cuda(format!(
                    "residual_backward: {} images × {n} tokens != {m} rows",
                    keep.len()
                )));
            }
            n
        }
        None => 1,
    };
    let (mi, di, ni, ci) = (
        as_i32("M", m)?,
        as_i32("D", d)?,
        as_i32("n", n)?,
        SUM_ROWS as i32,
    );
    nonempty("residual_backward", m * d)?;
    let mut dbranch = dev.empty::<f32>(m * d)?;
    let p = m.div_ceil(SUM_ROWS);
    let mut part = gamma.map(|_| dev.empty::<f32>(p * d)).transpose()?;
    let name = format!("residual_bwd_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    let s = dev.stream();
    let (pg, pk) = (
        ptr_or_null(s, gamma),
        ptr_or_null(s, row_scale.map(|r| r.0)),
    );
    let pp = ptr_mut_or_null(s, part.as_mut());
    // SAFETY: yv, dy and dbranch hold M·D values, γ D, keep M / n, part P·D (or null when no γ).
    unsafe {
        launch!(
            dev,
            f,
            name,
            column_grid(d, p),
            [yv, &pg, &pk, &ni, dy, &mut dbranch, &pp, &mi, &di, &ci]
        )
    }?;
    let dgamma = match part {
        Some(part) => {
            let mut dg = dev.empty::<f32>(d)?;
            colsum_finish(dev, &part, &mut dg, false, (p, d))?;
            Some(dg)
        }
        None => None,
    };
    Ok((dbranch, dgamma))
}

/// Drop-path in the forward: x [B·n, D] (in place) row r *= keep[r / n], keep [B] (0 for a
/// dropped image, 1/(1 − p) for a kept one).
pub fn scale_rows<T: Storage>(
    dev: &CudaDevice,
    x: &mut CudaSlice<T>,
    keep: &CudaSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    f32_or_bf16::<T>("scale_rows")?;
    check_len("scale_rows x", x, keep.len() * n * d)?;
    let total = x.len();
    if total == 0 {
        return Ok(());
    }
    let (ni, di, len) = (as_i32("n", n)?, as_i32("D", d)?, total as i64);
    let name = format!("scale_rows_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    // SAFETY: x holds B·n·D values, keep B.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(total),
            [x, keep, &len, &ni, &di]
        )
    }?;
    Ok(())
}

/// Backward of the pooling [B·N, D] → [B, D]: dx [B·N, D] from dy [B, D]. Mean over the patch
/// tokens (rows 1..N of each image): dx = dy / (N − 1) there and 0 at the class token; class
/// token: dx = dy at row 0 and 0 elsewhere.
pub fn pool_backward(
    dev: &CudaDevice,
    dy: &CudaSlice<f32>,
    (b, n, d): (usize, usize, usize),
    how: crate::backend::Pool,
) -> Result<CudaSlice<f32>> {
    use crate::backend::Pool;
    check_len("pool_backward dy", dy, b * d)?;
    let mode = match how {
        Pool::MeanPatches if n < 2 => {
            return Err(Error::Cuda(format!(
                "pool_backward: a mean over patch tokens needs N >= 2 tokens, got {n}"
            )))
        }
        Pool::MeanPatches => 0i32,
        Pool::ClassToken if n < 1 => return Err(Error::Cuda("pool_backward: N = 0 tokens".into())),
        Pool::ClassToken => 1,
    };
    // The CPU's factor: 1/(N − 1) rounded once, then one product per value.
    let inv = 1.0 / (n.max(2) - 1) as f32;
    let (bi, ni, di) = (as_i32("B", b)?, as_i32("N", n)?, as_i32("D", d)?);
    nonempty("pool_backward", b * n * d)?;
    let mut dx = dev.empty::<f32>(b * n * d)?;
    let f = dev.function("elementwise", "pool_bwd_f32")?;
    // SAFETY: dy holds B·D values, dx B·N·D.
    unsafe {
        launch!(
            dev,
            f,
            "pool_bwd_f32",
            dev.grid_stride(b * n * d),
            [dy, &mut dx, &bi, &ni, &di, &mode, &inv]
        )
    }?;
    Ok(dx)
}

/// Backward of `mask_rows` (rows with mask[r] set replaced by the mask token): given dy [M, D]
/// (M = mask.len()), dx = dy with the masked rows zeroed and dtoken [D] = Σ of dy's masked rows
/// (chunks of 64 masked rows in row order, then the chunks in order).
pub fn mask_rows_backward(
    dev: &CudaDevice,
    dy: &CudaSlice<f32>,
    mask: &[bool],
    d: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let m = mask.len();
    check_len("mask_rows_backward dy", dy, m * d)?;
    nonempty("mask_rows_backward", m * d)?;
    let masked: Vec<i32> = (0..as_i32("M", m)?).filter(|&r| mask[r as usize]).collect();
    let mut dtoken = dev.empty::<f32>(d)?;
    column_sums_into(dev, dy, Some(&masked), SUM_ROWS, &mut dtoken, false, (m, d))?;
    let mut dx = dev.empty::<f32>(m * d)?;
    let flags: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
    let flags = dev.upload(&flags)?;
    let (n, di) = ((m * d) as i64, as_i32("D", d)?);
    let f = dev.function("elementwise", "mask_rows_bwd_f32")?;
    // SAFETY: dy and dx hold M·D values, flags M.
    unsafe {
        launch!(
            dev,
            f,
            "mask_rows_bwd_f32",
            dev.grid_stride(m * d),
            [dy, &flags, &mut dx, &n, &di]
        )
    }?;
    Ok((dx, dtoken))
}

/// The adjoint of gathering rows (out[r] = x[rows[r]]): dx [M, D] with dy [R, D]'s rows added at
/// `rows` (R = rows.len()). A row taken several times receives the sum of its gradients, in
/// increasing r as the CPU's scatter-add; rows never taken receive 0.
pub fn gather_rows_backward(
    dev: &CudaDevice,
    dy: &CudaSlice<f32>,
    rows: &[usize],
    (m, d): (usize, usize),
) -> Result<CudaSlice<f32>> {
    check_len("gather_rows_backward dy", dy, rows.len() * d)?;
    if let Some(&bad) = rows.iter().find(|&&r| r >= m) {
        return Err(Error::Cuda(format!(
            "gather_rows_backward: row {bad} out of range for {m} rows"
        )));
    }
    as_i32("R", rows.len())?;
    nonempty("gather_rows_backward", m * d)?;
    let (off, src) = csr_inverse(rows, m);
    let mut dx = dev.empty::<f32>(m * d)?;
    let (off, src) = (dev.upload(&off)?, dev.upload(&src)?);
    // SAFETY: dy holds R·D values and every source is < R, so src[k]·D + c < R·D; dx M·D.
    unsafe { csr_sum(dev, dy, &off, &src, &mut dx, (m, d), (d as i64, 1)) }?;
    Ok(dx)
}

/// The inverse of a map from R sources to M targets (`target[k]` < M, checked by the callers) as
/// CSR: offsets [M + 1] and sources [max(R, 1)], each target's sources in increasing k (a stable
/// counting sort): the order in which the CPU's scatter-adds add them. Built on the host, once.
pub(crate) fn csr_inverse(target: &[usize], m: usize) -> (Vec<i32>, Vec<i32>) {
    let mut off = vec![0i32; m + 1];
    for &t in target {
        off[t + 1] += 1;
    }
    for j in 0..m {
        off[j + 1] += off[j];
    }
    let mut next: Vec<i32> = off[..m].to_vec();
    let mut src = vec![0i32; target.len().max(1)];
    for (k, &t) in target.iter().enumerate() {
        src[next[t] as usize] = k as i32;
        next[t] += 1;
    }
    (off, src)
}

/// out [M, D]: out[j, c] = Σ over the sources k of target j (CSR `off` [M + 1], `src`, from
/// `csr_inverse`) of x[src[k]·s_src + c·s_col], added in k order, no atomics. The scatter-add of
/// gathered rows (s_src = D, s_col = 1) and BEiT's relative-position table gradient (s_src = 1,
/// s_col = N·N) in one kernel.
///
/// # Safety
/// Every source index s in `src` (up to off[M]) has s·s_src + (D − 1)·s_col inside x.
pub(crate) unsafe fn csr_sum(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    off: &CudaSlice<i32>,
    src: &CudaSlice<i32>,
    out: &mut CudaSlice<f32>,
    (m, d): (usize, usize),
    (s_src, s_col): (i64, i64),
) -> Result<()> {
    check_len("csr_sum offsets", off, m + 1)?;
    check_len("csr_sum output", out, m * d)?;
    let (mi, di) = (as_i32("M", m)?, as_i32("D", d)?);
    if m * d == 0 {
        return Ok(());
    }
    let f = dev.function("elementwise", "csr_sum_f32")?;
    // SAFETY: the caller's contract on x; off [M + 1] and out [M·D] checked above.
    unsafe {
        launch!(
            dev,
            f,
            "csr_sum_f32",
            dev.grid_stride(m * d),
            [x, off, src, out, &mi, &di, &s_src, &s_col]
        )
    }
}

/// Backward of the token assembly x[b, t] = (t = 0 ? cls : patches[b, t − 1]) (+ pos[t]):
/// given dy [B·N, D], returns dpatches [B·(N − 1), D], dcls [D] = Σ_b dy[b, 0] and, when the
/// model has a position embedding, dpos [N, D] = Σ_b dy[b, t] (images added in order).
#[allow(clippy::type_complexity)]
pub fn assemble_backward(
    dev: &CudaDevice,
    dy: &CudaSlice<f32>,
    (b, n, d): (usize, usize, usize),
    has_pos: bool,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    check_len("assemble_backward dy", dy, b * n * d)?;
    nonempty(
        "assemble_backward patches (N = 1 or B or D = 0)",
        b * n.saturating_sub(1) * d,
    )?;
    let (bi, ni, di) = (as_i32("B", b)?, as_i32("N", n)?, as_i32("D", d)?);
    as_i32("B·N", b * n)?;
    let mut dpatches = dev.empty::<f32>(b * (n - 1) * d)?;
    let mut dcls = dev.empty::<f32>(d)?;
    let mut dpos = has_pos.then(|| dev.empty::<f32>(n * d)).transpose()?;
    let f = dev.function("elementwise", "assemble_bwd_f32")?;
    let pp = ptr_mut_or_null(dev.stream(), dpos.as_mut());
    // SAFETY: dy holds B·N·D values, dpatches B·(N − 1)·D, dcls D, dpos N·D or null.
    unsafe {
        launch!(
            dev,
            f,
            "assemble_bwd_f32",
            dev.grid_stride(n * d),
            [dy, &mut dpatches, &mut dcls, &pp, &bi, &ni, &di]
        )
    }?;
    Ok((dpatches, dcls, dpos))
}

/// acc += g, both [n] f32 (gradient accumulation where the graph branches).
pub fn add_assign(dev: &CudaDevice, acc: &mut CudaSlice<f32>, g: &CudaSlice<f32>) -> Result<()> {
    check_len("add_assign g", g, acc.len())?;
    let n = acc.len();
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let f = dev.function("elementwise", "add_assign_f32")?;
    // SAFETY: both hold n values.
    unsafe { launch!(dev, f, "add_assign_f32", dev.grid_stride(n), [acc, g, &ni]) }?;
    Ok(())
}

/// x *= s, in place, x [n] f32.
pub fn scale(dev: &CudaDevice, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let f = dev.function("elementwise", "scale_f32")?;
    // SAFETY: x holds n values.
    unsafe { launch!(dev, f, "scale_f32", dev.grid_stride(n), [x, &s, &ni]) }?;
    Ok(())
}
