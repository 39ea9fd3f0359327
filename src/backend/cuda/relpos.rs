//! Launcher of kernels/relpos.cu: BEiT's dense relative-position bias [H, N, N] gathered on the
//! device from its table [R, H], as `model::relpos::gather_bias`. The index is checked and
//! uploaded once (`RelposGather::new`); each `gather` is then one launch, so training re-derives
//! the bias from the updated table after every step without a host round-trip.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use crate::error::{Error, Result};

/// BEiT's relative-position index [N·N] on the device, with the table's row count.
pub struct RelposGather {
    index: CudaSlice<i32>,
    rows: usize,
    nn: usize,
}

impl RelposGather {
    /// `index` [N·N] of table rows < `rows` (model/relpos.rs relative_position_index).
    pub fn new(dev: &CudaDevice, index: &[usize], rows: usize) -> Result<RelposGather> {
        let nn = index.len();
        as_i32("N·N", nn)?;
        as_i32("table rows", rows)?;
        if let Some((p, &ix)) = index.iter().enumerate().find(|(_, &ix)| ix >= rows) {
            return Err(Error::Cuda(format!(
                "relpos gather: index[{p}] = {ix} is past the table's {rows} rows"
            )));
        }
        let index: Vec<i32> = index.iter().map(|&ix| ix as i32).collect();
        Ok(RelposGather {
            index: dev.upload(&index)?,
            rows,
            nn,
        })
    }

    /// out [H, N, N] (f32), out[h, p] = table[index[p], h], from table [rows, H] (f32).
    pub fn gather(
        &self,
        dev: &CudaDevice,
        table: &CudaSlice<f32>,
        heads: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("relpos table", table, self.rows * heads)?;
        let total = heads * self.nn;
        let [hi, nni] = [as_i32("H", heads)?, as_i32("N·N", self.nn)?];
        as_i32("H·N·N", total)?;
        let mut out = dev.empty::<f32>(total)?;
        if total == 0 {
            return Ok(out);
        }
        let name = "relpos_gather_f32";
        let f = dev.function("relpos", name)?;
        // SAFETY: every index entry is < rows (checked in `new`) and h < H, so index·H + h lies
        // inside table [rows, H]; out holds H·N·N.
        unsafe {
            launch!(
                dev,
                f,
                name,
                dev.grid_stride(total),
                [table, &self.index, &mut out, &hi, &nni]
            )
        }?;
        Ok(out)
    }
}
