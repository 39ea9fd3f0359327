//! Activations on the device and the meter that counts their bytes.

use std::cell::Cell;
use std::rc::Rc;

use cudarc::driver::CudaSlice;

use crate::error::{Error, Result};

/// Live and peak bytes of the executor's activations and workspace.
#[derive(Default)]
pub struct Meter {
    live: Cell<usize>,
    peak: Cell<usize>,
}

impl Meter {
    pub(super) fn take(self: &Rc<Self>, bytes: usize) -> Lease {
        let live = self.live.get() + bytes;
        self.live.set(live);
        self.peak.set(self.peak.get().max(live));
        Lease {
            bytes,
            meter: Rc::clone(self),
        }
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.peak.set(self.live.get());
    }

    pub fn peak(&self) -> usize {
        self.peak.get()
    }
}

/// Bytes held by one buffer, given back to the meter when the buffer goes.
pub(in crate::model) struct Lease {
    bytes: usize,
    meter: Rc<Meter>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.meter.live.set(self.meter.live.get() - self.bytes);
    }
}

pub(in crate::model) enum Data<T> {
    F32(CudaSlice<f32>),
    Low(CudaSlice<T>),
}

/// An activation on the device: its shape, its storage (f32 or the compute type T) and its lease.
pub struct DeviceValue<T> {
    pub(in crate::model) shape: Vec<usize>,
    pub(in crate::model) data: Data<T>,
    pub(super) _lease: Lease,
}

impl<T> DeviceValue<T> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(in crate::model) fn rows_cols(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [m, d] => Ok((m, d)),
            ref s => Err(Error::Data(format!(
                "{what}: expected a matrix, got shape {s:?}"
            ))),
        }
    }

    pub(in crate::model) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            Data::Low(_) => Err(Error::Cuda(format!("{what}: expected an f32 activation"))),
        }
    }
}
