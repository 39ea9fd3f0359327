//! Google's BiT checkpoints and their names.
//!
//! `.npz` files (numpy's zip of `.npy` arrays, stored or deflated) are read without Python: every
//! array through the bounded .npy header parser (crate::npy), float16/32/64 in C order.
//! Google's BiT names are mapped to timm's, the kernels from TensorFlow's HWIO to OIHW:
//!
//! | Google (`resnet/` + ...)                          | timm                                  |
//! |---------------------------------------------------|---------------------------------------|
//! | `root_block/standardized_conv2d/kernel`           | `stem.conv.weight`                    |
//! | `blockS/unitUU/{a,b,c}/standardized_conv2d/kernel`| `stages.S-1.blocks.UU-1.conv{1,2,3}.weight` |
//! | `blockS/unitUU/{a,b,c}/group_norm/{gamma,beta}`   | `stages.S-1.blocks.UU-1.norm{1,2,3}.{weight,bias}` |
//! | `blockS/unitUU/a/proj/standardized_conv2d/kernel` | `stages.S-1.blocks.UU-1.downsample.conv.weight` |
//! | `group_norm/{gamma,beta}`                         | `norm.{weight,bias}`                  |
//! | `head/conv2d/{kernel,bias}`                       | `head.fc.{weight,bias}`               |
//!
//! Arrays under other names keep them (and are reported as unused).
//!
//! big_transfer's PyTorch names (the model MOS fine-tunes; its `.pth.tar` holds them under
//! "model", with DataParallel's `module.`, which the .pth reader and keymap remove) are mapped in
//! any checkpoint that has `root.conv.weight`: `root.conv` → `stem.conv`,
//! `body.blockS.unitUU.{gnN,convN,downsample}` → `stages.S-1.blocks.UU-1.{normN,convN,downsample.conv}`,
//! `before_head.gn` → `norm`, `head.conv` → `head.fc`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{RawTensor, WDType};
use crate::error::{Error, Result};

/// Whether the zip at `path` is an .npz: every entry a `.npy` (a PyTorch zip has `data.pkl`).
/// False for anything that does not open as a zip, so the caller's reader gives its own error.
pub fn is_npz(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(zip) = zip::ZipArchive::new(file) else {
        return false;
    };
    !zip.is_empty() && zip.file_names().all(|n| n.ends_with(".npy"))
}

/// Every array of the .npz at `path`, with Google's BiT names mapped to timm's.
pub fn read(path: &Path) -> Result<Vec<RawTensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let archive_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::format(path, format!("not a readable .npz (truncated?): {e}")))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| Error::format(path, format!("entry {i} of the .npz: {e}")))?;
        let entry = f.name().to_string();
        let at = PathBuf::from(format!("{}:{entry}", path.display()));
        // Stored entries hold at most the archive's bytes; deflated float data shrinks little.
        let limit = match f.compression() {
            zip::CompressionMethod::Stored => archive_len,
            _ => archive_len.saturating_mul(4),
        };
        let size = f.size();
        if size > limit {
            return Err(Error::format(
                &at,
                format!("declares {size} bytes, more than the {archive_len}-byte archive can hold"),
            ));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        f.by_ref()
            .take(size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| Error::format(&at, format!("reading (truncated file?): {e}")))?;
        if bytes.len() as u64 != size {
            return Err(Error::format(
                &at,
                format!("holds {} bytes, not its declared {size}", bytes.len()),
            ));
        }
        let name = entry.strip_suffix(".npy").unwrap_or(&entry).to_string();
        out.push(array(&at, name, &bytes)?);
    }
    Ok(out.into_iter().map(from_google).collect())
}

/// One .npy entry as a raw tensor in C order.
fn array(at: &Path, name: String, bytes: &[u8]) -> Result<RawTensor> {
    let h = crate::npy::header(at, bytes)?;
    let dtype = match h.descr.as_str() {
        "<f4" => WDType::F32,
        "<f2" => WDType::F16,
        "<f8" => WDType::F64,
        d => {
            return Err(Error::format(
                at,
                format!("dtype {d}: only little-endian float16/32/64 arrays are weights"),
            ))
        }
    };
    // The header parser refuses Fortran order (beyond one non-trivial axis, where it is C order).
    let data = h.body(at, bytes, dtype.size())?.to_vec();
    Ok(RawTensor {
        name,
        dtype,
        shape: h.shape,
        data,
    })
}

/// Bytes of a C-order array of `shape` with its axes permuted: output axis i is input axis perm[i].
fn permute(data: &[u8], shape: &[usize], perm: &[usize], elt: usize) -> Vec<u8> {
    let nd = shape.len();
    let mut in_strides = vec![1usize; nd];
    for d in (0..nd.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * shape[d + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * elt);
    let mut idx = vec![0usize; nd];
    for _ in 0..numel {
        let src: usize = idx.iter().zip(perm).map(|(&i, &p)| i * in_strides[p]).sum();
        out.extend_from_slice(&data[src * elt..(src + 1) * elt]);
        for d in (0..nd).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// timm's name for Google's BiT name `name`, if it is one.
fn google_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("resnet/")?;
    let leaf = |p: &str| match p {
        "standardized_conv2d/kernel" => Some("conv"),
        "group_norm/gamma" => Some("weight"),
        "group_norm/beta" => Some("bias"),
        _ => None,
    };
    match rest {
        "root_block/standardized_conv2d/kernel" => return Some("stem.conv.weight".into()),
        "group_norm/gamma" => return Some("norm.weight".into()),
        "group_norm/beta" => return Some("norm.bias".into()),
        "head/conv2d/kernel" => return Some("head.fc.weight".into()),
        "head/conv2d/bias" => return Some("head.fc.bias".into()),
        _ => {}
    }
    let (stage, rest) = rest.strip_prefix("block")?.split_once('/')?;
    let (unit, rest) = rest.strip_prefix("unit")?.split_once('/')?;
    let stage = stage.parse::<usize>().ok()?.checked_sub(1)?;
    let unit = unit.parse::<usize>().ok()?.checked_sub(1)?;
    let pre = format!("stages.{stage}.blocks.{unit}");
    if rest == "a/proj/standardized_conv2d/kernel" {
        return Some(format!("{pre}.downsample.conv.weight"));
    }
    let (which, rest) = rest.split_once('/')?;
    let j = match which {
        "a" => 1,
        "b" => 2,
        "c" => 3,
        _ => return None,
    };
    Some(match leaf(rest)? {
        "conv" => format!("{pre}.conv{j}.weight"),
        w => format!("{pre}.norm{j}.{w}"),
    })
}

/// A Google-named array under timm's name: 4-D kernels HWIO → OIHW, norms and biases flat.
fn from_google(mut t: RawTensor) -> RawTensor {
    let Some(name) = google_name(&t.name) else {
        return t;
    };
    if t.shape.len() == 4 && name.ends_with("weight") {
        t.data = permute(&t.data, &t.shape, &[3, 2, 0, 1], t.dtype.size());
        t.shape = vec![t.shape[3], t.shape[2], t.shape[0], t.shape[1]];
    } else if t.shape.len() > 1 && t.shape[..t.shape.len() - 1].iter().all(|&d| d == 1) {
        t.shape = vec![t.shape[t.shape.len() - 1]];
    }
    t.name = name;
    t
}

/// timm's name for big_transfer's PyTorch name `name`, if it is one.
fn big_transfer_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("root.conv.") {
        return Some(format!("stem.conv.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("before_head.gn.") {
        return Some(format!("norm.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("head.conv.") {
        return Some(format!("head.fc.{rest}"));
    }
    let rest = name.strip_prefix("body.block")?;
    let (stage, rest) = rest.split_once('.')?;
    let (unit, rest) = rest.strip_prefix("unit")?.split_once('.')?;
    let stage = stage.parse::<usize>().ok()?.checked_sub(1)?;
    let unit = unit.parse::<usize>().ok()?.checked_sub(1)?;
    let pre = format!("stages.{stage}.blocks.{unit}");
    let (module, leaf) = rest.split_once('.')?;
    let module = match module {
        "downsample" => "downsample.conv".to_string(),
        m if m.starts_with("gn") => format!("norm{}", &m[2..]),
        m if m.starts_with("conv") => m.to_string(),
        _ => return None,
    };
    Some(format!("{pre}.{module}.{leaf}"))
}

/// A checkpoint in big_transfer's PyTorch names (it has `root.conv.weight`) under timm's names;
/// any other checkpoint as it is.
pub fn from_big_transfer<E>(entries: BTreeMap<String, E>) -> BTreeMap<String, E> {
    if !entries.contains_key("root.conv.weight") {
        return entries;
    }
    entries
        .into_iter()
        .map(|(k, e)| (big_transfer_name(&k).unwrap_or(k), e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_and_big_transfer_names_map_to_timms() {
        for (g, t) in [
            (
                "resnet/root_block/standardized_conv2d/kernel",
                "stem.conv.weight",
            ),
            (
                "resnet/block3/unit23/c/standardized_conv2d/kernel",
                "stages.2.blocks.22.conv3.weight",
            ),
            (
                "resnet/block1/unit01/a/group_norm/gamma",
                "stages.0.blocks.0.norm1.weight",
            ),
            (
                "resnet/block4/unit01/a/proj/standardized_conv2d/kernel",
                "stages.3.blocks.0.downsample.conv.weight",
            ),
            ("resnet/group_norm/beta", "norm.bias"),
            ("resnet/head/conv2d/kernel", "head.fc.weight"),
        ] {
            assert_eq!(google_name(g).as_deref(), Some(t), "{g}");
        }
        assert_eq!(google_name("resnet/block1/unit01/d/group_norm/gamma"), None);
        for (b, t) in [
            ("root.conv.weight", "stem.conv.weight"),
            (
                "body.block2.unit04.gn3.bias",
                "stages.1.blocks.3.norm3.bias",
            ),
            (
                "body.block1.unit01.conv2.weight",
                "stages.0.blocks.0.conv2.weight",
            ),
            (
                "body.block3.unit01.downsample.weight",
                "stages.2.blocks.0.downsample.conv.weight",
            ),
            ("before_head.gn.weight", "norm.weight"),
            ("head.conv.bias", "head.fc.bias"),
        ] {
            assert_eq!(big_transfer_name(b).as_deref(), Some(t), "{b}");
        }
    }

    #[test]
    fn a_fortran_ordered_array_is_refused_naming_the_entry() {
        let dict = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
        let mut h = format!("{dict}{}", " ".repeat(128 - 10 - dict.len() - 1));
        h.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[0u8; 24]);
        let e = array(Path::new("x.npz:a.npy"), "a".into(), &bytes)
            .err()
            .expect("Fortran order accepted")
            .to_string();
        assert!(e.contains("x.npz:a.npy") && e.contains("Fortran"), "{e}");
    }

    #[test]
    fn hwio_kernels_become_oihw() {
        // [kh=1, kw=2, I=2, O=3] with value = its HWIO index.
        let vals: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let t = from_google(RawTensor {
            name: "resnet/head/conv2d/kernel".into(),
            dtype: WDType::F32,
            shape: vec![1, 2, 2, 3],
            data: bytemuck::cast_slice(&vals).to_vec(),
        });
        assert_eq!(t.shape, vec![3, 2, 1, 2]);
        let got: Vec<f32> = super::super::to_f32(&t.data, WDType::F32).unwrap();
        // out[o, i, 0, x] = in[0, x, i, o] = (x·2 + i)·3 + o
        let want: Vec<f32> = (0..3)
            .flat_map(|o| {
                (0..2).flat_map(move |i| (0..2).map(move |x| ((x * 2 + i) * 3 + o) as f32))
            })
            .collect();
        assert_eq!(got, want);
    }
}
