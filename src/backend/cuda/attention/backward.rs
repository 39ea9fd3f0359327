//! The attention backward for training: gradients of q, k, v (and of the dense bias) from the
//! forward's probabilities, one strided-batched GEMM per product over images × heads around a
//! softmax-backward kernel (`backward_batched*`), and BEiT's relative-position table gradient
//! from the dense bias gradient (`RelposScatter`, `relpos_table_grad`).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::batched::{at, at_mut, permute};
use super::Dims;
use crate::backend::cuda::device::{as_i32, check_len, f32_or_bf16, nonempty, CudaDevice};
use crate::backend::cuda::matmul::{cudaDataType_t, data_type, gemm_rm, RowMajor};
use crate::backend::cuda::{elementwise, Storage};
use crate::error::{Error, Result};

/// Images per partial of the dbias sum: the CPU attention backward's IMAGES_PER_GROUP
/// (src/backend/cpu/attention.rs), so that dbias adds the images in the CPU's order.
const DBIAS_IMAGES: usize = 4;

/// Scratch of `backward_batched_with` for one (batch, dims, precision), made once and kept by a
/// training loop: head-major q, k, v (`qkvh`, 3·B·N·D) and dO (`doh`, B·N·D) in the GEMMs'
/// operand type, dP/dS (`ds`, B·H·N·N f32), the head-major dq, dk, dv (`dqkvh`, 3·B·N·D f32),
/// and for bf16 one B·H·N·N bf16 buffer that holds P, then dS, rounded for their GEMMs.
pub struct BackwardScratch<T> {
    qkvh: CudaSlice<T>,
    doh: CudaSlice<T>,
    ds: CudaSlice<f32>,
    dqkvh: CudaSlice<f32>,
    half: Option<CudaSlice<T>>,
    dims: (usize, usize, usize, usize),
}

impl<T: Storage> BackwardScratch<T> {
    pub fn new(dev: &CudaDevice, dims: &Dims) -> Result<BackwardScratch<T>> {
        f32_or_bf16::<T>("attention backward")?;
        let Dims { b, n, h, dh } = *dims;
        let (bnd, bhnn) = (b * n * h * dh, b * h * n * n);
        nonempty(&format!("attention backward ({dims})"), bnd)?;
        Ok(BackwardScratch {
            qkvh: dev.empty::<T>(3 * bnd)?,
            doh: dev.empty::<T>(bnd)?,
            ds: dev.empty::<f32>(bhnn)?,
            dqkvh: dev.empty::<f32>(3 * bnd)?,
            half: (T::NAME != "f32")
                .then(|| dev.empty::<T>(bhnn))
                .transpose()?,
            dims: (b, n, h, dh),
        })
    }

    /// The dims this scratch was made for, as `Dims`.
    pub fn dims(&self) -> Dims {
        let (b, n, h, dh) = self.dims;
        Dims { b, n, h, dh }
    }
}

/// Gradients of the attention forward from its probabilities, for the whole batch:
/// qkv [B·N, 3·D] (T = f32 or bf16; q | k | v, head h at columns h·Dh of each), probs P
/// [B, H, N, N] f32 (from `forward_keep_probs_*`), dout [B·N, D] f32. Per (image b, head h):
///   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q,
/// returned as dqkv [B·N, 3·D] f32 in qkv's layout, and with `want_dbias` dbias [H, N, N] f32 =
/// Σ_b dS_b (groups of 4 images, then the groups, as the CPU adds them). Same math and layout as
/// `backend::cpu::attention::backward` (which uses scale = Dh^-1/2). Each product is ONE
/// strided-batched GEMM over the B·H heads (head-major copies of q, k, v and dO as in
/// `forward_batched`). bf16: the GEMM operands are bf16 (dO, P and dS rounded, as autocast
/// does) with f32 accumulation and f32 outputs; the softmax backward and dbias are f32
/// throughout. Makes its scratch for this call; a training loop keeps a `BackwardScratch` per
/// (batch, precision) and calls `backward_batched_with`.
pub fn backward_batched<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    probs: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    want_dbias: bool,
    dims: &Dims,
    scale: f32,
) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    f32_or_bf16::<T>("attention backward")?;
    let Dims { b, n, h, dh } = *dims;
    let (bnd, bhnn) = (b * n * h * dh, b * h * n * n);
    // The buffers first, so a wrong length is named before the scratch's empty-shape refusal.
    check_len("attention backward qkv", qkv, 3 * bnd)?;
    check_len("attention backward probs", probs, bhnn)?;
    check_len("attention backward dout", dout, bnd)?;
    let mut ws = BackwardScratch::<T>::new(dev, dims)?;
    backward_batched_with(dev, qkv, probs, dout, want_dbias, dims, scale, &mut ws)
}

/// `backward_batched` with the caller's scratch (`BackwardScratch::new` for these dims): only the
/// returned dqkv and dbias are allocated.
#[allow(clippy::too_many_arguments)]
pub fn backward_batched_with<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    probs: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    want_dbias: bool,
    dims: &Dims,
    scale: f32,
    ws: &mut BackwardScratch<T>,
) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    f32_or_bf16::<T>("attention backward")?;
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    let (bnd, nn, bh) = (b * n * d, n * n, b * h);
    check_len("attention backward qkv", qkv, 3 * bnd)?;
    check_len("attention backward probs", probs, bh * nn)?;
    check_len("attention backward dout", dout, bnd)?;
    if ws.dims != (b, n, h, dh) {
        return Err(Error::Cuda(format!(
            "attention backward: scratch made for {}, called with {dims}",
            ws.dims()
        )));
    }
    nonempty(&format!("attention backward ({dims})"), bnd)?;
    let ni = as_i32("N", n)?;
    as_i32("H·N·N", h * nn)?;
    let rows = (bh * n) as i64;
    let ty = data_type::<T>();
    let ndh = n * dh;
    let BackwardScratch {
        qkvh,
        doh,
        ds,
        dqkvh,
        half,
        ..
    } = ws;

    // Head-major q, k, v (as the forward) and dO, in the GEMMs' operand type.
    permute(dev, "split", qkv, qkvh, 3 * bnd, dims)?;
    permute_grad(dev, "split", dout, doh, 1, dims)?;
    // P as the dV GEMM's operand: itself in f32, rounded to bf16 (into `half`) for a bf16 GEMM.
    let p_op = match half.as_mut() {
        Some(p) => {
            elementwise::cast(dev, probs, p)?;
            at(dev, p, 0)
        }
        None => at(dev, probs, 0),
    };
    // The GEMMs' operands: batches of B·H row-major matrices, [N, Dh] per head (`head`) or [N, N]
    // (`square`), of element type `ty`, used as is or transposed.
    let head = |ptr, ty, trans| RowMajor {
        ptr,
        ty,
        ld: dh,
        stride: ndh,
        trans,
    };
    let square = |ptr, ty, trans| RowMajor {
        ptr,
        ty,
        ld: n,
        stride: nn,
        trans,
    };
    let f32_ty = cudaDataType_t::CUDA_R_32F;
    let (q_op, k_op, v_op) = (at(dev, qkvh, 0), at(dev, qkvh, bnd), at(dev, qkvh, 2 * bnd));
    let do_op = at(dev, doh, 0);
    let ds_ptr = at_mut(dev, ds, 0);
    let (dq, dk, dv) = (
        at_mut(dev, dqkvh, 0),
        at_mut(dev, dqkvh, bnd),
        at_mut(dev, dqkvh, 2 * bnd),
    );
    // SAFETY (the four GEMMs): every operand is a batch of B·H row-major matrices inside its
    // buffer: [N, Dh] (stride N·Dh) in qkvh (3 blocks of B·N·D), doh and dqkvh; [N, N] (stride
    // N·N) in P, dS and `half`; the scratch was checked against these dims above.
    unsafe {
        gemm_rm(
            dev,
            "attention backward dV = Pᵀ·dO",
            (n, dh, n),
            1.0,
            square(p_op, ty, true),
            head(do_op, ty, false),
            0.0,
            (dv, dh, ndh),
            bh,
        )?;
        gemm_rm(
            dev,
            "attention backward dP = dO·Vᵀ",
            (n, n, dh),
            1.0,
            head(do_op, ty, false),
            head(v_op, ty, true),
            0.0,
            (ds_ptr, n, nn),
            bh,
        )?;
    }
    let f = dev.function("attention", "attention_softmax_bwd_f32")?;
    // SAFETY: probs and ds hold B·H·N rows of N.
    unsafe {
        launch!(
            dev,
            f,
            "attention_softmax_bwd_f32",
            dev.warp_per_row(bh * n),
            [probs, &mut *ds, &rows, &ni]
        )
    }?;
    let dbias = if want_dbias {
        // Σ_b dS_b: dS read as [B, H·N·N] and summed by the column-sum kernels in the CPU's
        // image groups.
        let mut dbias = dev.empty::<f32>(h * nn)?;
        elementwise::column_sums_into(dev, ds, None, DBIAS_IMAGES, &mut dbias, false, (b, h * nn))?;
        Some(dbias)
    } else {
        None
    };
    // dS as the dQ/dK GEMMs' operand: itself in f32, rounded to bf16 (over P's copy) for bf16.
    let (ds_op, ds_ty) = match half.as_mut() {
        Some(p) => {
            elementwise::cast(dev, ds, p)?;
            (at(dev, p, 0), ty)
        }
        None => (ds_ptr, f32_ty),
    };
    // SAFETY: as above.
    unsafe {
        gemm_rm(
            dev,
            "attention backward dQ = s·dS·K",
            (n, dh, n),
            scale,
            square(ds_op, ds_ty, false),
            head(k_op, ty, false),
            0.0,
            (dq, dh, ndh),
            bh,
        )?;
        gemm_rm(
            dev,
            "attention backward dK = s·dSᵀ·Q",
            (n, dh, n),
            scale,
            square(ds_op, ds_ty, true),
            head(q_op, ty, false),
            0.0,
            (dk, dh, ndh),
            bh,
        )?;
    }
    let mut dqkv = dev.empty::<f32>(3 * bnd)?;
    permute_grad(dev, "merge", dqkvh, &mut dqkv, 3, dims)?;
    Ok((dqkv, dbias))
}

/// attention_{split,merge}_grad_U: `parts` f32 blocks of B·N·D ([B·N, parts·D] ↔ head-major
/// [parts, B, H, N, Dh]) into U, as `permute` for the f32 gradients (dO in, dq|dk|dv out).
fn permute_grad<U: Storage>(
    dev: &CudaDevice,
    which: &str,
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<U>,
    parts: i32,
    dims: &Dims,
) -> Result<()> {
    let (bi, ni, hi, di) = dims.kernel_args()?;
    let Dims { b, n, h, dh } = *dims;
    let count = parts as usize * b * n * h * dh;
    let name = format!("attention_{which}_grad_{}", U::NAME);
    let f = dev.function("attention", &name)?;
    // SAFETY: the caller checked src and dst against `parts` blocks of B·N·D.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(count),
            [src, dst, &parts, &bi, &ni, &hi, &di]
        )
    }
}

/// BEiT's relative-position index [N·N] (table row of each (query i, key j) pair, i·N + j) turned
/// around once per model and uploaded: for each of the `rows` table rows, the ascending list of
/// pairs that read it (CSR: offsets [rows + 1], positions [N·N]). `grad` then sums the dense bias
/// gradient into the table gradient with one thread per output and no atomics.
pub struct RelposScatter {
    offsets: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    rows: usize,
    nn: usize,
}

impl RelposScatter {
    /// `index` [N·N] of table rows < `rows` (model/relpos.rs relative_position_index), N tokens.
    pub fn new(dev: &CudaDevice, index: &[usize], rows: usize, n: usize) -> Result<RelposScatter> {
        let nn = n * n;
        if index.len() != nn {
            return Err(Error::Cuda(format!(
                "relpos scatter: index holds {} entries, N = {n} tokens need {nn}",
                index.len()
            )));
        }
        as_i32("N·N", nn)?;
        as_i32("table rows", rows)?;
        if let Some((p, &ix)) = index.iter().enumerate().find(|(_, &ix)| ix >= rows) {
            return Err(Error::Cuda(format!(
                "relpos scatter: index[{p}] = {ix} is past the table's {rows} rows"
            )));
        }
        // Each table row's pairs in ascending order: the order in which the CPU's scatter adds.
        let (offsets, positions) = elementwise::csr_inverse(index, rows);
        Ok(RelposScatter {
            offsets: dev.upload(&offsets)?,
            positions: dev.upload(&positions)?,
            rows,
            nn,
        })
    }

    /// dtable [rows, H] (f32), dtable[r, h] = Σ over the pairs p of row r of dbias[h, p]: the table
    /// gradient of `model::relpos::scatter_bias_grad` from dbias [H, N, N] (f32), in its order.
    pub fn grad(
        &self,
        dev: &CudaDevice,
        dbias: &CudaSlice<f32>,
        h: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("relpos dbias", dbias, h * self.nn)?;
        let total = self.rows * h;
        as_i32("H", h)?;
        as_i32("rows·H", total)?;
        nonempty(
            &format!("relpos table gradient ({} rows, H = {h})", self.rows),
            total,
        )?;
        let mut dtable = dev.empty::<f32>(total)?;
        // SAFETY: every position is < N·N (checked in `new`) and h < H, so h·N·N + position lies
        // inside dbias [H, N·N]; dtable holds rows·H.
        unsafe {
            elementwise::csr_sum(
                dev,
                dbias,
                &self.offsets,
                &self.positions,
                &mut dtable,
                (self.rows, h),
                (1, self.nn as i64),
            )
        }?;
        Ok(dtable)
    }
}

/// The relative-position table gradient [rows, H] from dbias [H, N, N] and the index [N·N]: a
/// one-off `RelposScatter::new(..).grad(..)` (a training loop keeps the `RelposScatter`).
pub fn relpos_table_grad(
    dev: &CudaDevice,
    dbias: &CudaSlice<f32>,
    index: &[usize],
    rows: usize,
    h: usize,
) -> Result<CudaSlice<f32>> {
    let n = (index.len() as f64).sqrt().round() as usize;
    RelposScatter::new(dev, index, rows, n)?.grad(dev, dbias, h)
}
