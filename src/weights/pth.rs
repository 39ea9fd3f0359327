//! Restricted reader for PyTorch zip checkpoints (.pth/.pt): placeholder until implemented.

use std::path::Path;

use super::RawTensor;
use crate::error::{Error, Result};

/// Reads every tensor of the state dict in a PyTorch zip checkpoint.
pub fn read(path: &Path) -> Result<Vec<RawTensor>> {
    Err(Error::format(
        path,
        "PyTorch .pth reading is not implemented yet",
    ))
}
