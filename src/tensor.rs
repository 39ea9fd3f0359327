//! `Tensor` = shape + storage. No math lives here: ops are in `backend`.
//!
//! CPU storage is either an owned `Vec<f32>` or a read-only view into a memory-mapped weights file
//! (zero-copy: the page cache is the only copy). A CUDA variant joins `Storage` with the CUDA backend.

use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Element types that appear in weight files and feature stores. Compute on the CPU is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

#[derive(Clone)]
pub enum Storage {
    /// Owned host memory.
    Owned(Arc<Vec<f32>>),
    /// `len` f32 values at byte `offset` of a mapped file; `offset` is 4-byte aligned.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.storage {
            Storage::Owned(_) => "owned",
            Storage::Mapped { .. } => "mapped",
        };
        write!(f, "Tensor({:?}, {kind})", self.shape)
    }
}

impl Tensor {
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        // Checked: a shape read from a file can have a product that wraps to data.len().
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            let n = n.map_or("more than usize::MAX".to_string(), |n| n.to_string());
            return Err(Error::Data(format!(
                "shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Owned(Arc::new(data)),
        })
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Owned(Arc::new(vec![0.0; n])),
        }
    }

    /// A view into a mapped file. The caller guarantees `offset` is 4-byte aligned and in range.
    pub(crate) fn mapped(shape: &[usize], map: Arc<Mmap>, offset: usize) -> Tensor {
        let len = shape.iter().product();
        debug_assert!(offset % 4 == 0 && offset + 4 * len <= map.len());
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Mapped { map, offset, len },
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(v) => v.as_slice(),
            Storage::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + 4 * *len])
            }
        }
    }

    /// Mutable access; a mapped or shared tensor is copied first (copy on write).
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        if let Storage::Mapped { .. } = self.storage {
            let v = self.as_slice().to_vec();
            self.storage = Storage::Owned(Arc::new(v));
        }
        match &mut self.storage {
            Storage::Owned(v) => Arc::make_mut(v).as_mut_slice(),
            Storage::Mapped { .. } => unreachable!("converted to owned above"),
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Owned(v) => Arc::try_unwrap(v).unwrap_or_else(|v| v.as_ref().clone()),
            Storage::Mapped { .. } => self.as_slice().to_vec(),
        }
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(self.numel()) {
            return Err(Error::Data(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The two dimensions of a matrix; an error naming `what` otherwise.
    pub fn dims2(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(Error::Data(format!(
                "{what}: expected a matrix, got shape {:?}",
                self.shape
            ))),
        }
    }
}
