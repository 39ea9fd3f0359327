//! Launchers of kernels/loss.cu: cross-entropy with label smoothing and its gradient, as
//! src/train/loss.rs `cross_entropy`, and the mean squared error of masked image modelling, as
//! src/train/mim.rs `mse`, MOS's group-softmax loss, as src/train/loss.rs `group_softmax` (f64
//! inside, deterministic sums), and MODE's ALPA head (ReLU and the cross-view attention terms),
//! as src/train/alpa.rs (f32, every sum in one thread in a fixed order).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
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
    as_i32("M·M·T·max(T, D)", m * m * t * t.max(d))?;
    Ok((
        as_i32("M", m)?,
        as_i32("T", t)?,
        as_i32("D", d)?,
        1.0 / (d as f32).sqrt(),
    ))
}

/// ALPA's cross terms t(b←a) = Σ_p cos(V_b[p], (softmax(Q_b K_aᵀ/√D) V_a)[p]) of q, k, v
/// [M·T, D], as `train::alpa::alpa_terms`: terms [M, M] (`b·M + a`) on the device. Scratch:
/// M²·T² probabilities.
pub fn alpa_terms(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    dims: (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    let (mi, ti, di, inv) = alpa_sizes(q, k, v, dims)?;
    let (m, t, _) = dims;
    let mut probs = dev.empty::<f32>(m * m * t * t)?;
    let mut cosv = dev.empty::<f32>(m * m * t)?;
    let mut terms = dev.empty::<f32>(m * m)?;
    let f = dev.function("loss", "alpa_cross_rows")?;
    // SAFETY: q, k, v hold M·T·D values (checked), probs M²·T², cosv M²·T.
    unsafe {
        launch!(
            dev,
            f,
            "alpa_cross_rows",
            per_item(m * m * t),
            [q, k, v, &mi, &ti, &di, &inv, &mut probs, &mut cosv]
        )
    }?;
    let f = dev.function("loss", "alpa_cross_sum")?;
    // SAFETY: cosv holds M²·T values, terms M².
    unsafe {
        launch!(
            dev,
            f,
            "alpa_cross_sum",
            per_item(m * m),
            [&cosv, &mi, &ti, &mut terms]
        )
    }?;
    Ok(terms)
}

/// The backward of `alpa_terms` for ∂L/∂terms `g` [M, M] (on the device): (dq, dk, dv)
/// [M·T, D], as `train::alpa::alpa_terms_backward`. Scratch: 2·M²·T² + M²·T·D values.
pub fn alpa_terms_backward(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    dims: (usize, usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    let (mi, ti, di, inv) = alpa_sizes(q, k, v, dims)?;
    let (m, t, d) = dims;
    check_len("alpa_terms_backward g", g, m * m)?;
    let mut probs = dev.empty::<f32>(m * m * t * t)?;
    let mut dsc = dev.empty::<f32>(m * m * t * t)?;
    let mut dx = dev.empty::<f32>(m * m * t * d)?;
    let (mut dq, mut dk, mut dv) = (
        dev.empty::<f32>(m * t * d)?,
        dev.empty::<f32>(m * t * d)?,
        dev.empty::<f32>(m * t * d)?,
    );
    let f = dev.function("loss", "alpa_cross_backward_rows")?;
    // SAFETY: q, k, v, dq, dv hold M·T·D values, g M², probs and dsc M²·T², dx M²·T·D.
    unsafe {
        launch!(
            dev,
            f,
            "alpa_cross_backward_rows",
            per_item(m * t),
            [q, k, v, &mi, &ti, &di, &inv, g, &mut probs, &mut dsc, &mut dx, &mut dq, &mut dv]
        )
    }?;
    let f = dev.function("loss", "alpa_cross_backward_keys")?;
    // SAFETY: as above; dk holds M·T·D values.
    unsafe {
        launch!(
            dev,
            f,
            "alpa_cross_backward_keys",
            per_item(m * t),
            [q, &mi, &ti, &di, &probs, &dsc, &dx, &mut dk, &mut dv]
        )
    }?;
    Ok((dq, dk, dv))
}
