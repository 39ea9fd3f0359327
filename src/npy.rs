//! .npy files (numpy's format) for inputs, features and scores: float32, C order.

use std::path::Path;

use npyz::WriterBuilder;

mod header;
pub use header::{parse as header, Header, MAX_HEADER};

use crate::error::{Error, Result};

/// Reads a float32 .npy; the error names the file and what it holds when it is not one.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_f32(path, &bytes)
}

/// [`read_f32`] of bytes in memory; `path` only names the file in errors.
pub fn parse_f32(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let h = header(path, bytes)?;
    if h.descr != "<f4" {
        return Err(Error::format(
            path,
            format!(
                "expected float32 (<f4) data, found {}; convert with x.astype(np.float32)",
                h.descr
            ),
        ));
    }
    let body = h.body(path, bytes, 4)?;
    let data = body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((h.shape, data))
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

/// A float .npy as a tensor: little-endian float32 is memory-mapped and used in place (the page
/// cache is the only copy, so a store larger than RAM still opens); float16 is converted.
pub fn map_float(path: &Path) -> Result<crate::Tensor> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a file truncated under us is the caller's race, as with any
    // mmap-based reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let h = header(path, &map)?;
    let size = match h.descr.as_str() {
        "<f4" => 4,
        "<f2" => 2,
        other => {
            return Err(Error::format(
                path,
                format!("expected float32 or float16 data, found {other}"),
            ))
        }
    };
    // Checked against the file before anything is allocated or mapped as a tensor.
    let body = h.body(path, &map, size)?;
    let offset = h.offset;
    if size == 4 && offset % 4 == 0 {
        return Ok(crate::Tensor::mapped(
            &h.shape,
            std::sync::Arc::new(map),
            offset,
        ));
    }
    let data: Vec<f32> = if size == 4 {
        body.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        body.chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    };
    crate::Tensor::from_vec(&h.shape, data)
}

/// An integer (or integral float) 1-D .npy as indices, e.g. labels.
pub fn read_indices(path: &Path) -> Result<Vec<i64>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_indices(path, &bytes)
}

/// [`read_indices`] of bytes in memory; `path` only names the file in errors.
pub fn parse_indices(path: &Path, bytes: &[u8]) -> Result<Vec<i64>> {
    let h = header(path, bytes)?;
    if h.shape.len() != 1 {
        return Err(Error::format(
            path,
            format!("expected a 1-D array, found shape {:?}", h.shape),
        ));
    }
    let descr = h.descr.as_str();
    let size = match descr {
        "<i8" | "<u8" | "<f8" => 8,
        "<i4" | "<u4" | "<f4" => 4,
        "<i2" | "<u2" => 2,
        "|u1" | "|i1" => 1,
        other => {
            return Err(Error::format(
                path,
                format!("expected integer labels, found dtype {other}"),
            ))
        }
    };
    let body = h.body(path, bytes, size)?;
    let vals: Vec<i64> = body
        .chunks_exact(size)
        .map(|b| match descr {
            "<i8" | "<u8" => i64::from_le_bytes(b.try_into().expect("8 bytes")),
            "<f8" => f64::from_le_bytes(b.try_into().expect("8 bytes")) as i64,
            "<i4" => i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64,
            "<u4" => u32::from_le_bytes(b.try_into().expect("4 bytes")) as i64,
            "<f4" => f32::from_le_bytes(b.try_into().expect("4 bytes")) as i64,
            "<i2" => i16::from_le_bytes(b.try_into().expect("2 bytes")) as i64,
            "<u2" => u16::from_le_bytes(b.try_into().expect("2 bytes")) as i64,
            "|i1" => b[0] as i8 as i64,
            _ => b[0] as i64,
        })
        .collect();
    Ok(vals)
}

/// Writes an int64 .npy atomically.
pub fn write_i64(path: &Path, data: &[i64]) -> Result<()> {
    crate::fsutil::with_atomic_file(path, |w| {
        let mut npy = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[data.len() as u64])
            .writer(w)
            .begin_nd()?;
        npy.extend(data.iter().copied())?;
        npy.finish()
    })
}

/// A version-1 .npy header for a little-endian array of `descr` ('<f4', '<i8', ...), padded so the
/// data starts at a multiple of 64 bytes (numpy's own layout, so readers can map it aligned).
pub fn header_bytes(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes a float .npy of `shape` atomically from row blocks produced one at a time (the whole
/// array never has to be in memory), as float32, or float16 when `half` is set (rounded to
/// nearest). `fill` gets a sink for the blocks, in order.
pub fn write_f32_blocks(
    path: &Path,
    shape: &[usize],
    half: bool,
    fill: impl FnOnce(&mut dyn FnMut(&[f32]) -> std::io::Result<()>) -> std::io::Result<()>,
) -> Result<()> {
    let want: usize = shape.iter().product();
    crate::fsutil::with_atomic_file(path, |w| {
        use std::io::Write;
        w.write_all(&header_bytes(if half { "<f2" } else { "<f4" }, shape))?;
        let mut written = 0usize;
        let mut sink = |block: &[f32]| -> std::io::Result<()> {
            written += block.len();
            if half {
                let h: Vec<half::f16> = block.iter().map(|&v| half::f16::from_f32(v)).collect();
                w.write_all(bytemuck::cast_slice(&h))
            } else {
                w.write_all(bytemuck::cast_slice(block))
            }
        };
        fill(&mut sink)?;
        if written != want {
            return Err(std::io::Error::other(format!(
                "wrote {written} values for shape {shape:?}"
            )));
        }
        Ok(())
    })
}
