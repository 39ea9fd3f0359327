//! Parameters on the device: uploaded on first use and found again by their checkpoint name,
//! the T copies of the blocks' GEMM weights, what is derived from parameters (joined biases,
//! dense position biases), and the f32 masters that training updates in place.

use std::collections::HashMap;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda as cu;
use crate::backend::cuda::device::cuda_err;
use crate::error::{Error, Result};
use crate::model::cuda_attention::Compute;
use crate::model::layers::{Linear, LinearBias, Param, RelBias};
use crate::tensor::Tensor;

use super::{same_type, CudaExec, DeviceParam};

impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    /// The f32 parameter `name` (uploaded on first use).
    pub(in crate::model) fn param_f32(
        &mut self,
        name: &str,
        t: &Tensor,
    ) -> Result<&CudaSlice<f32>> {
        if self.masters.contains_key(name) {
            return Ok(&self.masters[name]);
        }
        if !self.params.contains_key(name) {
            let up = self.dev.upload(t.as_slice())?;
            self.params.insert(name.to_string(), DeviceParam::F32(up));
        }
        match &self.params[name] {
            DeviceParam::F32(s) => Ok(s),
            DeviceParam::Low(_) => Err(Error::Cuda(format!("{name}: uploaded as {}", T::NAME))),
        }
    }

    /// Uploads the T parameter `name` if it is not on the device yet.
    pub(in crate::model) fn ensure_low(&mut self, name: &str, t: &Tensor) -> Result<()> {
        if !self.params.contains_key(name) && self.masters.contains_key(name) {
            let m = &self.masters[name];
            let low = match same_type::<T>(m) {
                Some(same) => self.dev.stream().clone_dtod(same),
                None => {
                    let mut out = self.dev.empty::<T>(m.len())?;
                    cu::elementwise::cast(&self.dev, m, &mut out)?;
                    Ok(out)
                }
            }
            .map_err(cuda_err("copy a master weight"))?;
            self.params.insert(name.to_string(), DeviceParam::Low(low));
        }
        if !self.params.contains_key(name) {
            let host: Vec<T> = t.as_slice().iter().map(|&v| T::from_f32(v)).collect();
            let up = self.dev.upload(&host)?;
            self.params.insert(name.to_string(), DeviceParam::Low(up));
        }
        Ok(())
    }

    pub(in crate::model) fn low(&self, name: &str) -> Result<&CudaSlice<T>> {
        match self.params.get(name) {
            Some(DeviceParam::Low(s)) => Ok(s),
            _ => Err(Error::Cuda(format!("{name}: not uploaded as {}", T::NAME))),
        }
    }

    pub(in crate::model) fn f32_param(&self, name: &str) -> Result<&CudaSlice<f32>> {
        if let Some(m) = self.masters.get(name) {
            return Ok(m);
        }
        match self.params.get(name) {
            Some(DeviceParam::F32(s)) => Ok(s),
            _ => Err(Error::Cuda(format!("{name}: not uploaded as f32"))),
        }
    }

    pub(in crate::model) fn ensure_f32(&mut self, p: &Param) -> Result<()> {
        self.param_f32(&p.name, &p.value).map(|_| ())
    }

    /// Uploads the host value of a tensor derived from parameters under `key` (inference: the
    /// parameters never change, so the loader's copy is the one to use).
    fn derived_from_host(&mut self, key: &str, host: &Tensor) -> Result<()> {
        let up = self.dev.upload(host.as_slice())?;
        self.params.insert(key.to_string(), DeviceParam::F32(up));
        Ok(())
    }

    /// The key of linear layer `l`'s f32 bias on the device (None without one): the parameter
    /// itself, or BEiT's joined [q; 0; v] qkv bias, cached until `refresh_params`. When training,
    /// the joined bias is copied from the masters on the device (two device-to-device copies
    /// into zeros), never through the host.
    pub(in crate::model) fn linear_bias(&mut self, l: &Linear) -> Result<Option<String>> {
        match &l.bias {
            LinearBias::None => Ok(None),
            LinearBias::Full(p) => {
                self.ensure_f32(p)?;
                Ok(Some(p.name.clone()))
            }
            LinearBias::QV { q, v, joined } => {
                let key = format!("{}:bias", l.w.name);
                if self.params.contains_key(&key) {
                    return Ok(Some(key));
                }
                match (self.masters.get(&q.name), self.masters.get(&v.name)) {
                    (Some(qm), Some(vm)) => {
                        let d = qm.len();
                        if vm.len() != d {
                            return Err(Error::Cuda(format!(
                                "{}: q bias of {d} values, v bias of {}",
                                l.w.name,
                                vm.len()
                            )));
                        }
                        let mut out = self.dev.zeros::<f32>(3 * d)?;
                        let stream = self.dev.stream();
                        let what = || cuda_err(format!("join the qkv bias of {}", l.w.name));
                        stream
                            .memcpy_dtod(qm, &mut out.slice_mut(0..d))
                            .map_err(what())?;
                        stream
                            .memcpy_dtod(vm, &mut out.slice_mut(2 * d..3 * d))
                            .map_err(what())?;
                        self.params.insert(key.clone(), DeviceParam::F32(out));
                    }
                    _ => self.derived_from_host(&key, joined)?,
                }
                Ok(Some(key))
            }
        }
    }

    /// The key of the dense relative-position bias [H, N, N] of `r` on the device, cached until
    /// `refresh_params`. When training, gathered on the device from the table's master
    /// (kernels/relpos.cu; the index is uploaded once per table), never through the host.
    pub(in crate::model) fn dense_bias(&mut self, r: &RelBias, heads: usize) -> Result<String> {
        let key = format!("{}:dense", r.table.name);
        if self.params.contains_key(&key) {
            return Ok(key);
        }
        let Some(table) = self.masters.get(&r.table.name) else {
            self.derived_from_host(&key, &r.dense)?;
            return Ok(key);
        };
        if !self.relpos_gather.contains_key(&r.table.name) {
            let rows = table.len() / heads.max(1);
            let gather = cu::relpos::RelposGather::new(&self.dev, &r.index, rows)?;
            self.relpos_gather.insert(r.table.name.clone(), gather);
        }
        let dense = self.relpos_gather[&r.table.name].gather(&self.dev, table, heads)?;
        self.params.insert(key.clone(), DeviceParam::F32(dense));
        Ok(key)
    }

    /// Trains from now on: every tensor of `params` becomes an f32 master on the device (found by
    /// name before anything cached), and what was cached is dropped.
    pub fn set_masters(
        &mut self,
        params: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.params.clear();
        self.masters = params
            .iter()
            .map(|(k, t)| Ok((k.clone(), self.dev.upload(t.as_slice())?)))
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The masters, for the optimiser to update in place.
    pub fn masters_mut(&mut self) -> &mut HashMap<String, CudaSlice<f32>> {
        &mut self.masters
    }

    /// After an update of the masters: drops what was derived from them (T copies of the GEMM
    /// weights, joined biases, dense position biases), so the next forward derives it again.
    pub fn refresh_params(&mut self) {
        self.params.clear();
    }

    /// The masters downloaded, by name (checkpoints, evaluation on the host).
    pub fn download_masters(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out: Vec<_> = self
            .masters
            .iter()
            .map(|(k, s)| Ok((k.clone(), self.dev.download(s)?)))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
