//! The training losses of `CudaExec` (cross-entropy, MOS's group softmax, MIM's squared error)
//! and ALPA's device ops (ReLU, the cross-view attention terms), each a launcher of
//! src/backend/cuda/loss.rs; the `TrainExec` impl in the parent delegates here. Only a scalar
//! loss, or ALPA's M×M terms, comes back to the host.

use std::rc::Rc;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use super::Buf;
use crate::backend::cuda as cu;
use crate::error::{Error, Result};
use crate::model::cuda_attention::Compute;
use crate::model::cuda_exec::{CudaExec, Data, DeviceValue};

impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    pub(super) fn cross_entropy_loss(
        &mut self,
        logits: &Buf<T>,
        labels: &[usize],
        smoothing: f32,
    ) -> Result<(f32, CudaSlice<f32>)> {
        let (b, c) = logits.rows_cols("cross_entropy logits")?;
        if b != labels.len() {
            return Err(Error::Data(format!(
                "cross_entropy: {b} rows of logits for {} labels",
                labels.len()
            )));
        }
        let z = logits.f32("cross_entropy logits")?;
        cu::loss::cross_entropy(self.device(), z, labels, c, smoothing)
    }

    pub(super) fn group_softmax_loss(
        &mut self,
        logits: &Buf<T>,
        groups: &[usize],
        labels: &[usize],
    ) -> Result<(f32, CudaSlice<f32>)> {
        let per_group = crate::train::loss::group_targets(labels, groups)?;
        let (b, _) = logits.rows_cols("group_softmax logits")?;
        if b != labels.len() {
            return Err(Error::Data(format!(
                "group_softmax: {b} rows of logits for {} labels",
                labels.len()
            )));
        }
        let z = logits.f32("group_softmax logits")?;
        cu::loss::group_softmax(self.device(), z, groups, &per_group)
    }

    pub(super) fn mse_loss(
        &mut self,
        pred: &Buf<T>,
        target: &[f32],
    ) -> Result<(f32, CudaSlice<f32>)> {
        let (r, k) = pred.rows_cols("mse prediction")?;
        if r * k != target.len() {
            return Err(Error::Data(format!(
                "mse: {} predictions against {} targets",
                r * k,
                target.len()
            )));
        }
        let t = self.up(target)?;
        cu::loss::mse(self.device(), pred.f32("mse prediction")?, &t, (r, k))
    }

    pub(super) fn alpa_relu(&mut self, x: &Buf<T>) -> Result<Buf<T>> {
        let y = cu::loss::alpa_relu(self.device(), x.f32("relu input")?)?;
        Ok(Rc::new(self.value(&x.shape, Data::F32(y))))
    }

    pub(super) fn alpa_relu_backward(
        &mut self,
        y: &Buf<T>,
        mut dy: CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        cu::loss::alpa_relu_backward(self.device(), y.f32("relu output")?, &mut dy)?;
        Ok(dy)
    }

    pub(super) fn alpa_cross_terms(
        &mut self,
        q: &Buf<T>,
        k: &Buf<T>,
        v: &Buf<T>,
        m: usize,
    ) -> Result<Vec<f32>> {
        let dims = alpa_dims(q, m)?;
        let (q, k, v) = (q.f32("alpa q")?, k.f32("alpa k")?, v.f32("alpa v")?);
        let terms = cu::loss::alpa_terms(self.device(), q, k, v, dims)?;
        self.device().download(&terms)
    }

    pub(super) fn alpa_cross_terms_backward(
        &mut self,
        q: &Buf<T>,
        k: &Buf<T>,
        v: &Buf<T>,
        m: usize,
        g: &[f32],
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let dims = alpa_dims(q, m)?;
        let (q, k, v) = (q.f32("alpa q")?, k.f32("alpa k")?, v.f32("alpa v")?);
        if g.len() != m * m {
            return Err(Error::Data(format!(
                "alpa_terms_backward: {} gradients for {m}×{m} terms",
                g.len()
            )));
        }
        let g = self.up(g)?;
        cu::loss::alpa_terms_backward(self.device(), q, k, v, &g, dims)
    }
}
/// ALPA's (M, T, d) from q [M·T, d] (k and v are checked by length in the launcher).
fn alpa_dims<T>(q: &DeviceValue<T>, m: usize) -> Result<(usize, usize, usize)> {
    let (rows, d) = q.rows_cols("alpa q")?;
    if m == 0 || rows % m != 0 {
        return Err(Error::Data(format!(
            "alpa_terms: {rows} rows do not split into {m} views"
        )));
    }
    Ok((m, rows / m, d))
}
