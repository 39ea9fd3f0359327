//! Joining pieces of a store: the chunks of one extraction, or the shard stores of several
//! (`mood merge`), into one store whose rows are in source order. Files are streamed row block by
//! row block, so a store larger than memory can be assembled.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ood::detector::Head;
use crate::store::{FeatureStore, Manifest, Skipped};
use crate::tensor::Tensor;

/// Rows with their source index and label (−1 = none).
pub(crate) struct Part {
    pub index: Vec<i64>,
    pub labels: Vec<i64>,
    pub features: Tensor,
    pub logits: Option<Tensor>,
    pub local: Option<Tensor>,
    pub odin: Option<Tensor>,
}

fn width(t: &Tensor) -> usize {
    t.shape()[1..].iter().product()
}

/// Writes `parts` (rows taken in `order`: (part, row)) as a store in `out`, manifest last.
fn write(
    parts: &[Part],
    order: &[(usize, usize)],
    out: &Path,
    head: Option<&Head>,
    mut manifest: Manifest,
) -> Result<usize> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let n = order.len();
    // Logits stay f32 (small, and softmax-based scores are sensitive to rounding).
    let f16 = manifest.dtype == "f16";
    let first = parts
        .iter()
        .find(|p| !p.index.is_empty())
        .ok_or_else(|| Error::Data("no image could be read: the store would be empty".into()))?;
    let shape_of = |t: &Tensor| {
        let mut s = t.shape().to_vec();
        s[0] = n;
        s
    };
    let f_shape = shape_of(&first.features);
    let column = |name: &str,
                  get: &dyn Fn(&Part) -> Option<&Tensor>,
                  shape: Vec<usize>,
                  half: bool|
     -> Result<()> {
        let w: usize = shape[1..].iter().product();
        crate::npy::write_f32_blocks(&out.join(name), &shape, half, |sink| {
            for &(p, r) in order {
                let t =
                    get(&parts[p]).ok_or_else(|| std::io::Error::other("a part lacks a column"))?;
                if width(t) != w {
                    return Err(std::io::Error::other(format!(
                        "{name}: rows of {} values, expected {w}",
                        width(t)
                    )));
                }
                sink(&t.as_slice()[r * w..(r + 1) * w])?;
            }
            Ok(())
        })
    };
    column("features.npy", &|p| Some(&p.features), f_shape, f16)?;
    if let Some(z) = &first.logits {
        column("logits.npy", &|p| p.logits.as_ref(), shape_of(z), false)?;
    }
    if let Some(l) = &first.local {
        column("local.npy", &|p| p.local.as_ref(), shape_of(l), f16)?;
    }
    if let Some(o) = &first.odin {
        column("odin.npy", &|p| p.odin.as_ref(), shape_of(o), false)?;
    }
    let index: Vec<i64> = order.iter().map(|&(p, r)| parts[p].index[r]).collect();
    crate::npy::write_i64(&out.join("index.npy"), &index)?;
    let labels: Vec<i64> = order.iter().map(|&(p, r)| parts[p].labels[r]).collect();
    if labels.iter().all(|&l| l >= 0) && !labels.is_empty() {
        crate::npy::write_i64(&out.join("labels.npy"), &labels)?;
    }
    if let Some(h) = head {
        crate::store::write_head(&out.join("head.safetensors"), h)?;
    }
    manifest.format = 1;
    if manifest.dtype.is_empty() {
        manifest.dtype = "f32".into();
    }
    manifest.count = n;
    manifest.dim = first.features.shape()[1];
    manifest.local_tokens = first.local.as_ref().map_or(0, |l| l.shape()[1]);
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Data(e.to_string()))?;
    crate::fsutil::write_atomic(&out.join("manifest.json"), json.as_bytes())?;
    Ok(n)
}

/// The chunks of one extraction, in order, into the store at `out`: (rows, skipped files).
pub(crate) fn assemble(
    chunks: &[PathBuf],
    out: &Path,
    head: Option<&Head>,
    mut manifest: Manifest,
    tokens: usize,
    odin: bool,
) -> Result<(usize, usize)> {
    let mut parts = Vec::new();
    for path in chunks {
        let c = super::load_chunk(path)?;
        let n = c.index.len();
        let get = |name: &str| -> Result<Option<Tensor>> {
            match c.store.shape_of(name) {
                Some(s) => Ok(Some(c.store.get(name, s)?)),
                None => Ok(None),
            }
        };
        let features =
            get("features")?.ok_or_else(|| Error::format(path, "chunk has no features"))?;
        let lacks = |name: &str| -> Result<bool> { Ok(n > 0 && get(name)?.is_none()) };
        if features.shape()[0] != n || (tokens > 0 && lacks("local")?) || (odin && lacks("odin")?) {
            return Err(Error::format(
                path,
                "chunk is inconsistent; delete it and rerun",
            ));
        }
        manifest.skipped.extend(c.skipped.iter().cloned());
        parts.push(Part {
            index: c.index.clone(),
            labels: c.labels.clone(),
            logits: get("logits")?,
            local: get("local")?,
            odin: get("odin")?,
            features,
        });
    }
    let order: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(p, part)| (0..part.index.len()).map(move |r| (p, r)))
        .collect();
    let skipped = manifest.skipped.len();
    Ok((write(&parts, &order, out, head, manifest)?, skipped))
}

/// `mood merge`: shard stores into one store in source order.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<usize> {
    if dirs.is_empty() {
        return Err(Error::Usage("mood merge needs at least one store".into()));
    }
    let mut parts = Vec::new();
    let mut manifest: Option<Manifest> = None;
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut head = None;
    for d in dirs {
        let s = FeatureStore::open(d)?;
        let ipath = d.join("index.npy");
        if !ipath.exists() {
            return Err(Error::format(
                &ipath,
                "missing: only stores written by `mood extract` can be merged",
            ));
        }
        let index = crate::npy::read_indices(&ipath)?;
        if index.len() != s.rows() {
            return Err(Error::format(
                &ipath,
                format!("{} rows, features.npy has {}", index.len(), s.rows()),
            ));
        }
        let m = s.manifest.clone();
        if let Some(first) = &manifest {
            if first.model != m.model
                || first.weights_sha256 != m.weights_sha256
                || first.dim != m.dim
            {
                return Err(Error::Data(format!(
                    "{} was extracted with {} ({}) but {} with {} ({}): shards must come from one model",
                    dirs[0].display(), first.model, first.weights_sha256, d.display(), m.model, m.weights_sha256
                )));
            }
        }
        skipped.extend(m.skipped.iter().cloned());
        manifest.get_or_insert(m);
        head = head.or(s.head.clone());
        let labels = match &s.labels {
            Some(l) => l.iter().map(|&x| x as i64).collect(),
            None => vec![-1; s.rows()],
        };
        parts.push(Part {
            index,
            labels,
            features: s.features.clone(),
            logits: s.logits.clone(),
            local: s.local.clone(),
            odin: s.odin.clone(),
        });
    }
    let mut order: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(p, part)| (0..part.index.len()).map(move |r| (p, r)))
        .collect();
    order.sort_by_key(|&(p, r)| parts[p].index[r]);
    if let Some(w) = order
        .windows(2)
        .find(|w| parts[w[0].0].index[w[0].1] == parts[w[1].0].index[w[1].1])
    {
        return Err(Error::Data(format!(
            "source row {} appears in two of the stores: were the same shard given twice?",
            parts[w[0].0].index[w[0].1]
        )));
    }
    let mut m = manifest.expect("at least one store");
    m.sources.retain(|s| !s.starts_with("shard "));
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    m.skipped = skipped;
    write(&parts, &order, out, head.as_ref(), m)
}
