//! Launchers of kernels/loss.cu: cross-entropy with label smoothing and its gradient, as
//! src/train/loss.rs `cross_entropy`, and the mean squared error of masked image modelling, as
//! src/train/mim.rs `mse`, MOS's group-softmax loss, as src/train/loss.rs `group_softmax` (f64
//! inside, deterministic sums), and MODE's ALPA head (ReLU and the cross-view attention terms),
//! as src/train/alpa.rs: the terms' contractions are cuBLAS GEMMs over blocks of view pairs with
//! bounded scratch (`ALPA_SCRATCH_BYTES`), the softmax, cosines and their sums small kernels
//! (f32, every sum in a fixed order).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use super::matmul::{cudaDataType_t, gemm_rm, RowMajor};
use crate::error::{Error, Result};

fn not_empty(b: usize, classes: usize) -> Result<()> {
    if b == 0 || classes == 0 {
        return Err(Error::Cuda(format!(
            "cross_entropy: an empty batch ({b} rows, {classes} classes)"
        )));
    }
    Ok(())
}

/// Cross-entropy of logits [B, C] against device labels [B] (i32) with label smoothing ε, as
/// torch's `CrossEntropyLoss(label_smoothing=ε)`: q = (1 − ε)·onehot(y) + ε/C,
/// loss = mean_b −Σ_c q_c log softmax(z_b)_c, dlogits = (softmax(z) − q) / B.
/// Returns (loss [1] on the device, dlogits [B, C]); no host synchronisation. A label outside
/// 0..C makes the loss and its row's gradients NaN (the host-label `cross_entropy` refuses it).
pub fn cross_entropy_device(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    labels: &CudaSlice<i32>,
    classes: usize,
    smoothing: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let b = labels.len();
    check_len("cross_entropy logits", logits, b * classes)?;
    not_empty(b, classes)?;
    let (bi, ci) = (as_i32("B", b)?, as_i32("C", classes)?);
    // The CPU's ε/C, rounded once in f32.
    let off = smoothing / classes as f32;
    let mut dz = dev.empty::<f32>(b * classes)?;
    let mut loss = dev.empty::<f32>(1)?;
    let mut rows = dev.empty::<f64>(b)?;
    let f = dev.function("loss", "cross_entropy_rows")?;
    // SAFETY: logits and dz hold B·C values, labels and rows B.
    unsafe {
        launch!(
            dev,
            f,
            "cross_entropy_rows",
            dev.warp_per_row(b),
            [logits, labels, &bi, &ci, &smoothing, &off, &mut dz, &mut rows]
        )
    }?;
    let f = dev.function("loss", "cross_entropy_sum")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: rows holds B values, loss 1.
    unsafe { launch!(dev, f, "cross_entropy_sum", cfg, [&rows, &bi, &mut loss]) }?;
    Ok((loss, dz))
}

/// `cross_entropy_device` with host labels (each checked < C, then uploaded) and the loss
/// downloaded (4 bytes, one sync): returns (loss, dlogits [B, C]), matching
/// `train::loss::cross_entropy` to about 1e-7 relative (both in f64; only the order of the f64
/// sums differs).
pub fn cross_entropy(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    labels: &[usize],
    classes: usize,
    smoothing: f32,
) -> Result<(f32, CudaSlice<f32>)> {
    if let Some(&bad) = labels.iter().find(|&&y| y >= classes) {
        return Err(Error::Data(format!(
            "cross_entropy: label {bad} out of range for {classes} classes"
        )));
    }
    check_len("cross_entropy logits", logits, labels.len() * classes)?;
    not_empty(labels.len(), classes)?;
    let host: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
    let labels = dev.upload(&host)?;
    let (loss, dz) = cross_entropy_device(dev, logits, &labels, classes, smoothing)?;
    Ok((dev.download(&loss)?[0], dz))
}

/// Mean squared error of `pred` against `target`, both [R, K] (n = R·K): loss = Σ (p − t)² / n
/// and dpred = 2 (p − t) / n, as `train::mim::mse` (f64 sums; only their order differs).
/// Returns (loss [1] on the device, dpred [R, K]); no host synchronisation.
pub fn mse_device(
    dev: &CudaDevice,
    pred: &CudaSlice<f32>,
    target: &CudaSlice<f32>,
    (r, k): (usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    check_len("mse pred", pred, r * k)?;
    check_len("mse target", target, r * k)?;
    if r * k == 0 {
        return Err(Error::Cuda(format!("mse: no values ({r} rows of {k})")));
    }
    let (ri, ki) = (as_i32("R", r)?, as_i32("K", k)?);
    let n = (r * k) as f64;
    let mut dp = dev.empty::<f32>(r * k)?;
    let mut loss = dev.empty::<f32>(1)?;
    let mut rows = dev.empty::<f64>(r)?;
    let f = dev.function("loss", "mse_rows")?;
    // SAFETY: pred, target and dp hold R·K values, rows R.
    unsafe {
        launch!(
            dev,
            f,
            "mse_rows",
            dev.warp_per_row(r),
            [pred, target, &ri, &ki, &n, &mut dp, &mut rows]
        )
    }?;
    let f = dev.function("loss", "mse_sum")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: rows holds R values, loss 1.
    unsafe { launch!(dev, f, "mse_sum", cfg, [&rows, &ri, &n, &mut loss]) }?;
    Ok((loss, dp))
}

/// `mse_device` with the loss downloaded (4 bytes, one sync): (loss, dpred [R, K]).
pub fn mse(
    dev: &CudaDevice,
    pred: &CudaSlice<f32>,
    target: &CudaSlice<f32>,
    dims: (usize, usize),
) -> Result<(f32, CudaSlice<f32>)> {
    let (loss, dp) = mse_device(dev, pred, target, dims)?;
    Ok((dev.download(&loss)?[0], dp))
}

/// MOS's group-softmax loss of logits [B, W] (W = Σ (size + 1), group g's slice of columns
/// starting with its "others" slot), as `train::loss::group_softmax`: `labels[i][g]` is image i's
/// target within group g's slice; loss = Σ_g mean_i CE(slice_g), dlogits = (softmax − onehot) / B
/// per slice. Each label is checked against its slice; the loss is downloaded (4 bytes, one
/// sync): returns (loss, dlogits [B, W]), the loss bit for bit the CPU's when the f64 sums of
/// exp round alike (f64 inside; only the order of the exp sums differs).
pub fn group_softmax(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    group_sizes: &[usize],
    labels: &[Vec<usize>],
) -> Result<(f32, CudaSlice<f32>)> {
    let (b, g) = (labels.len(), group_sizes.len());
    let width: usize = group_sizes.iter().map(|s| s + 1).sum();
    check_len("group_softmax logits", logits, b * width)?;
    if b == 0 || g == 0 {
        return Err(Error::Cuda(format!(
            "group_softmax: an empty batch ({b} rows, {g} groups)"
        )));
    }
    let mut starts = vec![0i32; g + 1];
    for (i, s) in group_sizes.iter().enumerate() {
        starts[i + 1] = starts[i] + as_i32("group width", s + 1)?;
    }
    // Targets group-major ([G, B]), each checked < its slice's width.
    let mut y = Vec::with_capacity(b * g);
    for (gi, size) in group_sizes.iter().enumerate() {
        for row in labels {
            match row.get(gi) {
                Some(&t) if t <= *size => y.push(t as i32),
                _ => {
                    return Err(Error::Data(format!(
                        "group_softmax: image labels {row:?} do not fit group {gi} of {} outputs",
                        size + 1
                    )))
                }
            }
        }
    }
    let (bi, gi, wi) = (as_i32("B", b)?, as_i32("G", g)?, as_i32("W", width)?);
    let (starts, y) = (dev.upload(&starts)?, dev.upload(&y)?);
    let mut dz = dev.empty::<f32>(b * width)?;
    let mut loss = dev.empty::<f32>(1)?;
    let mut rows = dev.empty::<f64>(b * g)?;
    let f = dev.function("loss", "group_softmax_rows")?;
    // SAFETY: logits and dz hold B·W values, y and rows B·G, starts G + 1 (the last W).
    unsafe {
        launch!(
            dev,
            f,
            "group_softmax_rows",
            dev.warp_per_row(b * g),
            [logits, &y, &starts, &bi, &gi, &wi, &mut dz, &mut rows]
        )
    }?;
    let f = dev.function("loss", "group_softmax_sum")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: rows holds B·G values, loss 1.
    unsafe {
        launch!(
            dev,
            f,
            "group_softmax_sum",
            cfg,
            [&rows, &bi, &gi, &mut loss]
        )
    }?;
    Ok((dev.download(&loss)?[0], dz))
}

/// One thread per item, block 128.
fn per_item(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(128).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// y = max(x, 0) into a new buffer (ALPA's MLPs).
pub fn alpa_relu(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    let n = x.len();
    let mut y = dev.empty::<f32>(n.max(1))?;
    let f = dev.function("loss", "alpa_relu")?;
    let ni = n as i64;
    // SAFETY: x and y hold n values (y at least 1).
    unsafe { launch!(dev, f, "alpa_relu", per_item(n), [x, &mut y, &ni]) }?;
    Ok(y)
}

/// dy where y > 0, else 0, in place (y the ReLU's output).
pub fn alpa_relu_backward(
    dev: &CudaDevice,
    y: &CudaSlice<f32>,
    dy: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("alpa_relu_backward dy", dy, y.len())?;
    let n = y.len() as i64;
    let f = dev.function("loss", "alpa_relu_backward")?;
    // SAFETY: y and dy hold n values.
    unsafe { launch!(dev, f, "alpa_relu_backward", per_item(y.len()), [y, dy, &n]) }
}

pub use crate::backend::memory_budget::ALPA_SCRATCH_BYTES;

/// One block of ALPA's view pairs: query views b0.. (nb of them) × source views a0.. (na).
#[derive(Clone, Copy)]
struct AlpaBlock {
    b0: usize,
    nb: usize,
    a0: usize,
    na: usize,
}

/// (query views, source views) per block so that a block's scratch (`alpa_block_floats`) fits
/// `scratch_bytes`: as many source views as fit (the score GEMM's N = na·T), then as many query
/// views, the views spread evenly over the blocks.
fn alpa_block_shape(
    (m, t, d): (usize, usize, usize),
    grads: bool,
    scratch_bytes: usize,
) -> (usize, usize) {
    let pairs = (scratch_bytes / 4 / alpa_block_floats((t, d), 1, 1, grads)).max(1);
    let na = pairs.min(m);
    let nb = (pairs / na).clamp(1, m);
    let even = |n: usize| m.div_ceil(m.div_ceil(n));
    (even(nb), even(na))
}

/// Floats of scratch for a block of nb × na view pairs: the scores P [nb·T, na·T], with
/// gradients also dP (same size), and the attended values x̃ [nb·T, na, d].
fn alpa_block_floats((t, d): (usize, usize), nb: usize, na: usize, grads: bool) -> usize {
    let probs = nb * t * na * t;
    probs * if grads { 2 } else { 1 } + nb * t * na * d
}

/// The scratch ALPA's cross terms allocate for (M, T, d) under `scratch_bytes`, in bytes: the
/// forward's (`grads` false) or the backward's.
pub fn alpa_scratch_bytes(dims: (usize, usize, usize), grads: bool, scratch_bytes: usize) -> usize {
    let (nb, na) = alpa_block_shape(dims, grads, scratch_bytes);
    4 * alpa_block_floats((dims.1, dims.2), nb, na, grads)
}

/// The blocks covering all M × M view pairs, query views outer, source views inner (the order
/// of every accumulation across blocks).
fn alpa_blocks(m: usize, (nb, na): (usize, usize)) -> impl Iterator<Item = AlpaBlock> {
    (0..m).step_by(nb).flat_map(move |b0| {
        (0..m).step_by(na).map(move |a0| AlpaBlock {
            b0,
            nb: nb.min(m - b0),
            a0,
            na: na.min(m - a0),
        })
    })
}

/// ALPA's q, k, v [M·T, D] checked against (m, t, d); the kernels' i32 sizes and 1/√D.
fn alpa_sizes(
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    (m, t, d): (usize, usize, usize),
) -> Result<(i32, i32, i32, f32)> {
    for (what, s) in [("alpa q", q), ("alpa k", k), ("alpa v", v)] {
        check_len(what, s, m * t * d)?;
    }
    if m * t * d == 0 {
        return Err(Error::Cuda(format!(
            "alpa_terms: no values ({m} views of {t} tokens, width {d})"
        )));
    }
    as_i32("M·M", m * m)?;
    Ok((
        as_i32("M", m)?,
        as_i32("T", t)?,
        as_i32("D", d)?,
        1.0 / (d as f32).sqrt(),
    ))
}

/// The device address of element `off` of `s`.
fn addr(dev: &CudaDevice, s: &CudaSlice<f32>, off: usize) -> u64 {
    super::ptr_or_null(dev.stream(), Some(s)) + (off * 4) as u64
}

/// As `addr`, for a buffer written.
fn addr_mut(dev: &CudaDevice, s: &mut CudaSlice<f32>, off: usize) -> u64 {
    super::ptr_mut_or_null(dev.stream(), Some(s)) + (off * 4) as u64
}

/// A row-major f32 operand of `gemm_rm`.
fn rm(ptr: u64, ld: usize, stride: usize, trans: bool) -> RowMajor {
    RowMajor {
        ptr,
        ty: cudaDataType_t::CUDA_R_32F,
        ld,
        stride,
        trans,
    }
}

/// A block's attention: P = softmax(Q_b K_aᵀ/√D) per (query row, source view) into `p`
/// [nb·T, na·T] (one GEMM, then `alpa_softmax`) and x̃ = P V_a into `x` [nb·T, na, D] (one GEMM
/// batched over the na source views).
fn alpa_attend(
    dev: &CudaDevice,
    (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
    (p, x): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
    (t, d, inv): (usize, usize, f32),
    blk: AlpaBlock,
) -> Result<()> {
    let (rows, cols) = (blk.nb * t, blk.na * t);
    let (pq, pk, pv) = (
        addr(dev, q, blk.b0 * t * d),
        addr(dev, k, blk.a0 * t * d),
        addr(dev, v, blk.a0 * t * d),
    );
    let pp = addr_mut(dev, p, 0);
    // SAFETY: Q's rows b0·T.. (nb·T of them) and K's and V's rows a0·T.. (na·T) lie inside the
    // [M·T, D] buffers checked by `alpa_sizes`; p holds at least nb·T·na·T values and x
    // nb·T·na·D (allocated for the largest block).
    unsafe {
        gemm_rm(
            dev,
            "alpa scores S = Q·Kᵀ/√D",
            (rows, cols, d),
            inv,
            rm(pq, d, 0, false),
            rm(pk, d, 0, true),
            0.0,
            (pp, cols, 0),
            1,
        )?;
    }
    let segments = (rows * blk.na) as i64;
    let ti = t as i32;
    let f = dev.function("loss", "alpa_softmax")?;
    // SAFETY: p holds `segments` segments of T values.
    unsafe {
        launch!(
            dev,
            f,
            "alpa_softmax",
            dev.warp_per_row(rows * blk.na),
            [&mut *p, &segments, &ti]
        )
    }?;
    let (pp, px) = (addr(dev, p, 0), addr_mut(dev, x, 0));
    // SAFETY: as above; batch i reads P's columns i·T.. and V_{a0+i}, writes x̃'s (·, i, ·) rows.
    unsafe {
        gemm_rm(
            dev,
            "alpa attended values x̃ = P·V",
            (rows, d, t),
            1.0,
            rm(pp, cols, t, false),
            rm(pv, d, t * d, false),
            0.0,
            (px, blk.na * d, d),
            blk.na,
        )
    }
}

/// ALPA's cross terms t(b←a) = Σ_p cos(V_b[p], (softmax(Q_b K_aᵀ/√D) V_a)[p]) of q, k, v
/// [M·T, D], as `train::alpa::alpa_terms`: terms [M, M] (`b·M + a`) on the device, with at most
/// `ALPA_SCRATCH_BYTES` of scratch.
pub fn alpa_terms(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    dims: (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    alpa_terms_with_scratch(dev, q, k, v, dims, ALPA_SCRATCH_BYTES)
}

/// `alpa_terms` with at most `scratch_bytes` of scratch (`alpa_scratch_bytes`; at least one
/// view pair's): per block of view pairs, the score GEMM, the softmax, the x̃ GEMM and the
/// cosines summed over tokens in order.
pub fn alpa_terms_with_scratch(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    dims: (usize, usize, usize),
    scratch_bytes: usize,
) -> Result<CudaSlice<f32>> {
    let (mi, ti, di, inv) = alpa_sizes(q, k, v, dims)?;
    let (m, t, d) = dims;
    let shape = alpa_block_shape(dims, false, scratch_bytes);
    let (nb, na) = shape;
    let mut p = dev.empty::<f32>(nb * t * na * t)?;
    let mut x = dev.empty::<f32>(nb * t * na * d)?;
    let mut terms = dev.empty::<f32>(m * m)?;
    let f = dev.function("loss", "alpa_cos_terms")?;
    for blk in alpa_blocks(m, shape) {
        alpa_attend(dev, (q, k, v), (&mut p, &mut x), (t, d, inv), blk)?;
        let [b0, nbi, a0, nai] = [blk.b0, blk.nb, blk.a0, blk.na].map(|n| n as i32);
        // SAFETY: v holds M·T·D values, x the block's nb·T·na·D, terms M² (the block's pairs
        // inside).
        unsafe {
            launch!(
                dev,
                f,
                "alpa_cos_terms",
                per_item(blk.nb * blk.na),
                [v, &x, &mi, &ti, &di, &b0, &nbi, &a0, &nai, &mut terms]
            )
        }?;
    }
    Ok(terms)
}

/// The backward of `alpa_terms` for ∂L/∂terms `g` [M, M] (on the device): (dq, dk, dv)
/// [M·T, D], as `train::alpa::alpa_terms_backward`, with at most `ALPA_SCRATCH_BYTES` of scratch.
pub fn alpa_terms_backward(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    dims: (usize, usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    alpa_terms_backward_with_scratch(dev, q, k, v, g, dims, ALPA_SCRATCH_BYTES)
}

/// `alpa_terms_backward` with at most `scratch_bytes` of scratch. Per block of view pairs: the
/// forward's attention again, then the cosine's backward (dx̃ over x̃, and v's query-side part),
/// dP = dx̃·V_aᵀ (batched GEMM), the softmax's backward, and the three accumulating GEMMs
///   dQ_b += dS·K_blk,   dK_blk += dSᵀ·Q_b,   dV_a += P_aᵀ·dx̃_a (batched),
/// the blocks in a fixed order, so each gradient sums its blocks in the same order on every run.
#[allow(clippy::too_many_arguments)]
pub fn alpa_terms_backward_with_scratch(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    dims: (usize, usize, usize),
    scratch_bytes: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    let (mi, ti, di, inv) = alpa_sizes(q, k, v, dims)?;
    let (m, t, d) = dims;
    check_len("alpa_terms_backward g", g, m * m)?;
    let shape = alpa_block_shape(dims, true, scratch_bytes);
    let (nb, na) = shape;
    let mut p = dev.empty::<f32>(nb * t * na * t)?;
    let mut dp = dev.empty::<f32>(nb * t * na * t)?;
    let mut x = dev.empty::<f32>(nb * t * na * d)?;
    let (mut dq, mut dk, mut dv) = (
        dev.zeros::<f32>(m * t * d)?,
        dev.zeros::<f32>(m * t * d)?,
        dev.zeros::<f32>(m * t * d)?,
    );
    let cos_bwd = dev.function("loss", "alpa_cos_backward")?;
    let softmax_bwd = dev.function("loss", "alpa_softmax_backward")?;
    for blk in alpa_blocks(m, shape) {
        alpa_attend(dev, (q, k, v), (&mut p, &mut x), (t, d, inv), blk)?;
        let (rows, cols) = (blk.nb * t, blk.na * t);
        let [b0, nbi, a0, nai] = [blk.b0, blk.nb, blk.a0, blk.na].map(|n| n as i32);
        // SAFETY: v and dv hold M·T·D values, g M², x the block's nb·T·na·D.
        unsafe {
            launch!(
                dev,
                cos_bwd,
                "alpa_cos_backward",
                per_item(rows),
                [v, &mut x, g, &mi, &ti, &di, &b0, &nbi, &a0, &nai, &mut dv]
            )
        }?;
        let (pv, pdx, pdp) = (
            addr(dev, v, blk.a0 * t * d),
            addr(dev, &x, 0),
            addr_mut(dev, &mut dp, 0),
        );
        // SAFETY: batch i reads dx̃'s (·, i, ·) rows and V_{a0+i} [T, D], writes dP's columns
        // i·T.. of every row; all inside the buffers (see `alpa_attend`).
        unsafe {
            gemm_rm(
                dev,
                "alpa dP = dx̃·Vᵀ",
                (rows, t, d),
                1.0,
                rm(pdx, blk.na * d, d, false),
                rm(pv, d, t * d, true),
                0.0,
                (pdp, cols, t),
                blk.na,
            )
        }?;
        let segments = (rows * blk.na) as i64;
        // SAFETY: p and dp hold `segments` segments of T values.
        unsafe {
            launch!(
                dev,
                softmax_bwd,
                "alpa_softmax_backward",
                dev.warp_per_row(rows * blk.na),
                [&p, &mut dp, &segments, &ti, &inv]
            )
        }?;
        let (pq, pk) = (addr(dev, q, blk.b0 * t * d), addr(dev, k, blk.a0 * t * d));
        let (pds, pp) = (addr(dev, &dp, 0), addr(dev, &p, 0));
        let (pdq, pdk, pdv) = (
            addr_mut(dev, &mut dq, blk.b0 * t * d),
            addr_mut(dev, &mut dk, blk.a0 * t * d),
            addr_mut(dev, &mut dv, blk.a0 * t * d),
        );
        // SAFETY: dS [nb·T, na·T] and P in the scratch; Q's, dQ's rows b0·T.. (nb·T) and K's,
        // dK's, dV's rows a0·T.. (na·T) inside their [M·T, D] buffers.
        unsafe {
            gemm_rm(
                dev,
                "alpa dQ += dS·K",
                (rows, d, cols),
                1.0,
                rm(pds, cols, 0, false),
                rm(pk, d, 0, false),
                1.0,
                (pdq, d, 0),
                1,
            )?;
            gemm_rm(
                dev,
                "alpa dK += dSᵀ·Q",
                (cols, d, rows),
                1.0,
                rm(pds, cols, 0, true),
                rm(pq, d, 0, false),
                1.0,
                (pdk, d, 0),
                1,
            )?;
            gemm_rm(
                dev,
                "alpa dV += Pᵀ·dx̃",
                (t, d, rows),
                1.0,
                rm(pp, cols, t, true),
                rm(pdx, blk.na * d, d, false),
                1.0,
                (pdv, d, t * d),
                blk.na,
            )?;
        }
    }
    Ok((dq, dk, dv))
}
