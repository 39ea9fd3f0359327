//! Joining pieces of a store: the chunks of one extraction, or the shard stores of several
//! (`mood merge`), into one store whose rows are in source order. Files are streamed row block by
//! row block, so a store larger than memory can be assembled.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::features::Head;
use crate::store::{FeatureStore, Identity, Manifest, Skipped};
use crate::tensor::Tensor;

/// Rows with their source index and label (−1 = none).
pub(crate) struct Part {
    pub index: Vec<i64>,
    pub labels: Vec<i64>,
    pub features: Tensor,
    pub logits: Option<Tensor>,
    pub local: Option<Tensor>,
    pub odin: Option<Tensor>,
    pub layers: Option<Tensor>,
}

fn width(t: &Tensor) -> usize {
    t.shape()[1..].iter().product()
}

/// Writes `parts` (rows taken in `order`: (part, row)) as a store in `out`: the manifest first
/// without its completion record, the arrays, then the manifest with it and the files' list.
fn write(
    parts: &[Part],
    order: &[(usize, usize)],
    out: &Path,
    head: Option<&Head>,
    mut manifest: Manifest,
) -> Result<usize> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    manifest.complete = false;
    crate::store::write_manifest(out, &manifest)?;
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
    if let Some(l) = &first.layers {
        column("layers.npy", &|p| p.layers.as_ref(), shape_of(l), f16)?;
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
    if manifest.dtype.is_empty() {
        manifest.dtype = "f32".into();
    }
    manifest.count = n;
    manifest.dim = first.features.shape()[1];
    manifest.local_tokens = first.local.as_ref().map_or(0, |l| l.shape()[1]);
    let mut files = vec!["features.npy"];
    files.extend(first.logits.as_ref().map(|_| "logits.npy"));
    files.extend((labels.iter().all(|&l| l >= 0) && !labels.is_empty()).then_some("labels.npy"));
    files.extend(first.local.as_ref().map(|_| "local.npy"));
    files.push("index.npy");
    files.extend(first.odin.as_ref().map(|_| "odin.npy"));
    files.extend(first.layers.as_ref().map(|_| "layers.npy"));
    files.extend(head.map(|_| "head.safetensors"));
    manifest.files = files.into_iter().map(String::from).collect();
    manifest.complete = true;
    crate::store::write_manifest(out, &manifest)?;
    Ok(n)
}

/// The optional columns every chunk of an extraction must carry.
pub(crate) struct Columns {
    /// Patch tokens per row of `local` (0: none).
    pub tokens: usize,
    pub odin: bool,
    pub layers: bool,
}

/// The chunks of one extraction, in order, into the store at `out`: (rows, skipped files).
pub(crate) fn assemble(
    chunks: &[PathBuf],
    plan: &[Vec<usize>],
    out: &Path,
    head: Option<&Head>,
    mut manifest: Manifest,
    columns: Columns,
) -> Result<(usize, usize)> {
    let Columns {
        tokens,
        odin,
        layers,
    } = columns;
    let mut parts = Vec::new();
    for (path, planned) in chunks.iter().zip(plan) {
        let c = super::load_chunk(path)?;
        let n = c.index.len();
        // A chunk holds (some of, when images were skipped) the rows this run planned for it, in
        // order: anything else is a chunk of another plan.
        let in_plan = c
            .index
            .iter()
            .all(|&r| r >= 0 && planned.binary_search(&(r as usize)).is_ok())
            && c.index.windows(2).all(|w| w[0] < w[1]);
        if !in_plan {
            return Err(Error::format(
                path,
                "rows of another chunking or shard: rerun with --overwrite to start over",
            ));
        }
        let get = |name: &str| -> Result<Option<Tensor>> {
            match c.store.shape_of(name) {
                Some(s) => Ok(Some(c.store.get(name, s)?)),
                None => Ok(None),
            }
        };
        let features =
            get("features")?.ok_or_else(|| Error::format(path, "chunk has no features"))?;
        let lacks = |name: &str| -> Result<bool> { Ok(n > 0 && get(name)?.is_none()) };
        if features.shape()[0] != n
            || (tokens > 0 && lacks("local")?)
            || (odin && lacks("odin")?)
            || (layers && lacks("layers")?)
        {
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
            layers: get("layers")?,
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

/// The shard stores' identities must be one run's, shards 0..N-1 each once: returns the merged
/// store's identity (shard 0/1).
fn check_shards(dirs: &[PathBuf], ids: &[Identity]) -> Result<Identity> {
    let first = &ids[0];
    for (d, id) in dirs.iter().zip(ids).skip(1) {
        let diffs = first.differences(id, ("first store", "this one"), &["shard"]);
        if !diffs.is_empty() {
            return Err(Error::Data(format!(
                "{} and {} are not shards of one run: {}",
                dirs[0].display(),
                d.display(),
                diffs.join("; ")
            )));
        }
    }
    let n = first.shard.1;
    let mut seen: Vec<Option<&PathBuf>> = vec![None; n];
    for (d, id) in dirs.iter().zip(ids) {
        let (i, m) = id.shard;
        if m != n || i >= n {
            return Err(Error::Data(format!(
                "{} is shard {i}/{m}, {} is shard {}/{n}: shards of one run share N",
                d.display(),
                dirs[0].display(),
                first.shard.0
            )));
        }
        if let Some(other) = seen[i] {
            return Err(Error::Data(format!(
                "shard {i}/{n} given twice ({} and {}): each shard once",
                other.display(),
                d.display()
            )));
        }
        seen[i] = Some(d);
    }
    let missing: Vec<String> = (0..n)
        .filter(|&i| seen[i].is_none())
        .map(|i| format!("{i}/{n}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Data(format!(
            "shard {} missing: a merge needs every shard 0..{} of the run, or the store would lack their rows",
            missing.join(", "),
            n - 1
        )));
    }
    let mut merged = first.clone();
    merged.shard = (0, 1);
    Ok(merged)
}

/// `mood merge`: the shard stores of one `mood extract --shard` run into one store in source
/// order. With `overwrite`, a store already in `out` is replaced.
pub fn merge(dirs: &[PathBuf], out: &Path, overwrite: bool) -> Result<usize> {
    if dirs.is_empty() {
        return Err(Error::Usage("mood merge needs at least one store".into()));
    }
    for d in dirs {
        crate::fsutil::refuse_inside(out, "-o", d, "the shard store")?;
    }
    let mut parts = Vec::new();
    let mut manifests: Vec<Manifest> = Vec::new();
    let mut head = None;
    for d in dirs {
        let s = FeatureStore::open(d)?;
        if s.manifest.identity.is_none() {
            return Err(Error::Data(format!(
                "{}: its manifest records no identity (not written by this version of `mood extract`): extract it again to merge it",
                d.display()
            )));
        }
        let ipath = d.join("index.npy");
        if !s.manifest.files.iter().any(|f| f == "index.npy") {
            return Err(Error::format(
                &ipath,
                "not listed by the store: only stores written by `mood extract` can be merged",
            ));
        }
        let index = crate::npy::read_indices(&ipath)?;
        if index.len() != s.rows() {
            return Err(Error::format(
                &ipath,
                format!("{} rows, features.npy has {}", index.len(), s.rows()),
            ));
        }
        head = head.or(s.head.clone());
        let labels = match &s.labels {
            Some(l) => l.iter().map(|&x| x as i64).collect(),
            None => vec![-1; s.rows()],
        };
        manifests.push(s.manifest.clone());
        parts.push(Part {
            index,
            labels,
            features: s.features.clone(),
            logits: s.logits.clone(),
            local: s.local.clone(),
            odin: s.odin.clone(),
            layers: s.layers.clone(),
        });
    }
    let ids: Vec<Identity> = manifests
        .iter()
        .zip(dirs)
        .map(|(m, _)| m.identity.clone().unwrap_or_default())
        .collect();
    let merged_id = check_shards(dirs, &ids)?;
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
    let mut skipped: Vec<Skipped> = manifests.iter().flat_map(|m| m.skipped.clone()).collect();
    let mut m = manifests.swap_remove(0);
    m.sources.retain(|s| !s.starts_with("shard "));
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    m.skipped = skipped;
    m.identity = Some(merged_id);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _lock = crate::fsutil::Lock::acquire(&out.join(".lock"), out)?;
    crate::fsutil::remove_stale_temps(out, None);
    let occupied = out.join("manifest.json").exists()
        || out.join(".partial").exists()
        || crate::store::STORE_FILES
            .iter()
            .any(|f| out.join(f).exists());
    if occupied {
        if !overwrite {
            return Err(Error::Usage(format!(
                "{}: a store is already there; add --overwrite to replace it, or choose another -o",
                out.display()
            )));
        }
        super::state::clear(out)?;
    }
    write(&parts, &order, out, head.as_ref(), m)
}
