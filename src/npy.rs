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

/// Shape, dtype string and data offset of a .npy file's header (format versions 1-3).
fn header(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, String, usize)> {
    let bad = |m: &str| Error::format(path, format!("not a valid .npy file: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unknown format version {v}"))),
    };
    let text = bytes
        .get(start..start + len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = text.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("no dtype"))?
        .to_string();
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(Error::format(
            path,
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| bad("bad shape"))?;
    Ok((shape, descr, start + len))
}

/// A float .npy as a tensor: little-endian float32 is memory-mapped and used in place (the page
/// cache is the only copy, so a store larger than RAM still opens); float16 is converted.
pub fn map_float(path: &Path) -> Result<crate::Tensor> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a file truncated under us is the caller's race, as with any
    // mmap-based reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (shape, descr, offset) = header(path, &map)?;
    let n: usize = shape.iter().product();
    let size = match descr.as_str() {
        "<f4" => 4,
        "<f2" => 2,
        other => {
            return Err(Error::format(
                path,
                format!("expected float32 or float16 data, found {other}"),
            ))
        }
    };
    if map.len() < offset + n * size {
        return Err(Error::format(
            path,
            format!(
                "truncated: shape {shape:?} needs {} data bytes, the file has {}",
                n * size,
                map.len().saturating_sub(offset)
            ),
        ));
    }
    if size == 4 && offset % 4 == 0 {
        return Ok(crate::Tensor::mapped(
            &shape,
            std::sync::Arc::new(map),
            offset,
        ));
    }
    let data: Vec<f32> = if size == 4 {
        map[offset..offset + 4 * n]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        map[offset..offset + 2 * n]
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    };
    crate::Tensor::from_vec(&shape, data)
}

/// An integer (or integral float) 1-D .npy as indices, e.g. labels.
pub fn read_indices(path: &Path) -> Result<Vec<i64>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (shape, descr, offset) = header(path, &bytes)?;
    if shape.len() != 1 {
        return Err(Error::format(
            path,
            format!("expected a 1-D array, found shape {shape:?}"),
        ));
    }
    let n = shape[0];
    let body = &bytes[offset..];
    let size = match descr.as_str() {
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
    if body.len() < n * size {
        return Err(Error::format(path, "truncated data"));
    }
    let vals: Vec<i64> = body[..n * size]
        .chunks_exact(size)
        .map(|b| match descr.as_str() {
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
