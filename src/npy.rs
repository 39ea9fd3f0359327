//! .npy files (numpy's format) for inputs, features and scores: float32, C order.

use std::path::Path;

use npyz::WriterBuilder;

use crate::error::{Error, Result};

/// Reads a float32 .npy; the error names the file and what it holds when it is not one.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| Error::format(path, format!("not a valid .npy file: {e}")))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    if npy.order() != npyz::Order::C {
        return Err(Error::format(
            path,
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let type_str = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => {
            return Err(Error::format(
                path,
                format!("expected float32 data, found {other:?}"),
            ))
        }
    };
    if type_str != "<f4" {
        return Err(Error::format(
            path,
            format!(
                "expected float32 (<f4) data, found {type_str}; convert with x.astype(np.float32)"
            ),
        ));
    }
    let data: Vec<f32> = npy
        .into_vec()
        .map_err(|e| Error::format(path, format!("truncated or corrupt .npy data: {e}")))?;
    Ok((shape, data))
}

/// Writes a float32 .npy atomically (temporary name, then rename).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let shape64: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
    crate::fsutil::with_atomic_file(path, |w| {
        let mut npy = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape64)
            .writer(w)
            .begin_nd()?;
        npy.extend(data.iter().copied())?;
        npy.finish()
    })
}
