//! CIFAR-10 and CIFAR-100 as distributed: the python version (`cifar-10-batches-py`,
//! `cifar-100-python`: pickled dicts whose `data` is a uint8 numpy array [N, 3072]) or the binary
//! version (`cifar-10-batches-bin`, `cifar-100-binary`: records of label byte(s) then 3072 bytes).
//! Either way an image is 3072 bytes, the red, green and blue 32×32 planes; the layout is found
//! from the directory's contents. Images are kept in memory as stored (CIFAR-10's train split is
//! 150 MB), in torchvision's order: the batches in turn, the records in file order.
//!
//! The pickles go through the restricted reader (`weights::pickle`, numpy values only): nothing in
//! them is executed.

use std::path::{Path, PathBuf};

use super::image_folder::RgbImage;
use crate::error::{Error, Result};
use crate::weights::pickle::{self, Globals, Value};

pub const SIDE: usize = 32;
/// Bytes per image: 3 planes of 32×32.
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cifar10,
    Cifar100,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The python version: pickled batches, label names in `batches.meta` / `meta`.
    Pickle,
    /// The binary version: fixed-size records, label names in text files.
    Binary,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cifar10 => "cifar10",
            Kind::Cifar100 => "cifar100",
        }
    }

    pub fn classes(self) -> usize {
        match self {
            Kind::Cifar10 => 10,
            Kind::Cifar100 => 100,
        }
    }

    /// The official folder name of each layout.
    fn folder(self, layout: Layout) -> &'static str {
        match (self, layout) {
            (Kind::Cifar10, Layout::Pickle) => "cifar-10-batches-py",
            (Kind::Cifar10, Layout::Binary) => "cifar-10-batches-bin",
            (Kind::Cifar100, Layout::Pickle) => "cifar-100-python",
            (Kind::Cifar100, Layout::Binary) => "cifar-100-binary",
        }
    }

    /// The files of a split, and the file naming the classes.
    fn files(self, layout: Layout, split: Split) -> (Vec<String>, &'static str) {
        let ext = if layout == Layout::Binary { ".bin" } else { "" };
        let batches = match (self, split) {
            (Kind::Cifar10, Split::Train) => (1..=5).map(|i| format!("data_batch_{i}")).collect(),
            (Kind::Cifar10, Split::Test) => vec!["test_batch".to_string()],
            (Kind::Cifar100, Split::Train) => vec!["train".to_string()],
            (Kind::Cifar100, Split::Test) => vec!["test".to_string()],
        };
        let meta = match (self, layout) {
            (Kind::Cifar10, Layout::Pickle) => "batches.meta",
            (Kind::Cifar10, Layout::Binary) => "batches.meta.txt",
            (Kind::Cifar100, Layout::Pickle) => "meta",
            (Kind::Cifar100, Layout::Binary) => "fine_label_names.txt",
        };
        (batches.into_iter().map(|b| b + ext).collect(), meta)
    }
}

/// A parsed `cifar10:DIR[@train|@test]` / `cifar100:DIR[@train|@test]` data spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub dir: PathBuf,
    pub split: Split,
}

/// `Some` for a spec naming CIFAR (`cifar10:` or `cifar100:`), `None` for anything else. The split
/// is the text after the last `@` when it holds no `/`; train by default.
pub fn parse_spec(spec: &str) -> Option<Result<Spec>> {
    let (kind, rest) = if let Some(r) = spec.strip_prefix("cifar10:") {
        (Kind::Cifar10, r)
    } else if let Some(r) = spec.strip_prefix("cifar100:") {
        (Kind::Cifar100, r)
    } else {
        return None;
    };
    let (dir, split) = match rest.rsplit_once('@') {
        Some((d, s)) if !s.contains('/') => (d, Some(s)),
        _ => (rest, None),
    };
    let split = match split {
        None | Some("train") => Split::Train,
        Some("test") => Split::Test,
        Some(s) => {
            return Some(Err(Error::Usage(format!(
                "--data {spec}: unknown split `@{s}` (CIFAR has @train and @test)"
            ))))
        }
    };
    if dir.is_empty() {
        return Some(Err(Error::Usage(format!(
            "--data {spec}: expected {}:DIR[@train|@test], DIR holding {} or {}",
            kind.name(),
            kind.folder(Layout::Pickle),
            kind.folder(Layout::Binary)
        ))));
    }
    Some(Ok(Spec {
        kind,
        dir: PathBuf::from(dir),
        split,
    }))
}

/// One split of CIFAR-10 or CIFAR-100 in memory.
#[derive(Clone, Debug)]
pub struct Cifar {
    pub kind: Kind,
    pub split: Split,
    pub layout: Layout,
    /// The folder holding the files (`.../cifar-10-batches-py` and so on).
    pub root: PathBuf,
    /// Class names from the meta file (CIFAR-100: the fine labels).
    pub classes: Vec<String>,
    /// Label of each image (CIFAR-100: the fine label).
    pub labels: Vec<usize>,
    /// `len() × IMAGE_BYTES`, each image as stored: R, G, B planes.
    pub pixels: Vec<u8>,
    /// Each batch file with the index of its first image.
    pub files: Vec<(PathBuf, usize)>,
}

/// The layout of `dir` itself, from the files it holds.
fn layout_of(dir: &Path, kind: Kind) -> Option<Layout> {
    [Layout::Pickle, Layout::Binary].into_iter().find(|&l| {
        let (mut names, meta) = kind.files(l, Split::Test);
        names.extend(kind.files(l, Split::Train).0);
        names.push(meta.to_string());
        names.iter().any(|n| dir.join(n).is_file())
    })
}

/// Finds the layout: `dir` is one of the official folders (or holds its files), or contains one;
/// the python version first when both are there.
fn locate(dir: &Path, kind: Kind) -> Result<(PathBuf, Layout)> {
    if !dir.is_dir() {
        return Err(Error::format(dir, "no such directory"));
    }
    for layout in [Layout::Pickle, Layout::Binary] {
        let sub = dir.join(kind.folder(layout));
        if sub.is_dir() {
            let found = layout_of(&sub, kind).unwrap_or(layout);
            return Ok((sub, found));
        }
    }
    if let Some(layout) = layout_of(dir, kind) {
        return Ok((dir.to_path_buf(), layout));
    }
    let other = match kind {
        Kind::Cifar10 => Kind::Cifar100,
        Kind::Cifar100 => Kind::Cifar10,
    };
    let hint = match locate_quiet(dir, other) {
        true => format!(" (it holds {}: use {}:DIR)", other.name(), other.name()),
        false => String::new(),
    };
    Err(Error::format(
        dir,
        format!(
            "no {} data: expected {} or {} (or their files) here{hint}",
            kind.name(),
            kind.folder(Layout::Pickle),
            kind.folder(Layout::Binary)
        ),
    ))
}

fn locate_quiet(dir: &Path, kind: Kind) -> bool {
    [Layout::Pickle, Layout::Binary]
        .iter()
        .any(|&l| dir.join(kind.folder(l)).is_dir())
        || layout_of(dir, kind).is_some()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::format(path, "missing file (incomplete download?)"))
        }
        r => r.map_err(|e| Error::io(path, e)),
    }
}

impl Cifar {
    /// Reads `split` of the data set at `dir` (see [`locate`] for what `dir` may be).
    pub fn open(dir: &Path, kind: Kind, split: Split) -> Result<Cifar> {
        let (root, layout) = locate(dir, kind)?;
        let (batches, meta) = kind.files(layout, split);
        let classes = match layout {
            Layout::Pickle => pickle_names(&root.join(meta), kind)?,
            Layout::Binary => text_names(&root.join(meta), kind)?,
        };
        let mut c = Cifar {
            kind,
            split,
            layout,
            root: root.clone(),
            classes,
            labels: Vec::new(),
            pixels: Vec::new(),
            files: Vec::new(),
        };
        for b in batches {
            let path = root.join(b);
            let (pixels, labels) = match layout {
                Layout::Pickle => read_pickle_batch(&path, kind)?,
                Layout::Binary => read_binary_batch(&path, kind)?,
            };
            if let Some(&l) = labels.iter().find(|&&l| l >= c.classes.len()) {
                return Err(Error::format(
                    &path,
                    format!(
                        "label {l} out of range: {} names {} classes",
                        meta,
                        c.classes.len()
                    ),
                ));
            }
            c.files.push((path, c.labels.len()));
            c.pixels.extend_from_slice(&pixels);
            c.labels.extend(labels);
        }
        Ok(c)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` as 32×32 RGB (interleaved, as PIL's `Image.fromarray` of torchvision's HWC array).
    pub fn image(&self, i: usize) -> RgbImage {
        let src = &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES];
        let plane = SIDE * SIDE;
        let mut pixels = vec![0u8; IMAGE_BYTES];
        for (p, px) in pixels.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = src[c * plane + p];
            }
        }
        RgbImage {
            width: SIDE,
            height: SIDE,
            pixels,
        }
    }

    /// `FILE[k]`: the batch file and the record's place in it.
    pub fn item_name(&self, i: usize) -> String {
        let f = self.files.partition_point(|(_, start)| *start <= i) - 1;
        let (path, start) = &self.files[f];
        format!("{}[{}]", path.display(), i - start)
    }
}

/// A pickle file's top-level dict.
fn pickle_dict(path: &Path) -> Result<Vec<(Value, Value)>> {
    let data = read(path)?;
    match pickle::load_allowing(&data, Globals::Numpy) {
        Ok(Value::Dict(d)) => Ok(d),
        Ok(_) => Err(Error::format(
            path,
            "not a CIFAR batch: the pickle is not a dict",
        )),
        Err(e) => Err(Error::format(
            path,
            format!("unreadable pickle at byte {}: {}", e.offset, e.msg),
        )),
    }
}

/// The entry `key` of a pickled dict; keys are bytes (Python 2 strings) or text (Python 3).
fn entry<'a>(d: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    d.iter().find_map(|(k, v)| match k {
        Value::Str(s) if s == key => Some(v),
        Value::Bytes(b) if &**b == key.as_bytes() => Some(v),
        _ => None,
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Opaque(what) => what.clone(),
        Value::Array(a) => format!("a {} array of shape {:?}", a.dtype, a.shape),
        Value::List(l) => format!("a list of {}", l.len()),
        other => {
            let s = format!("{other:?}");
            s.chars().take(40).collect()
        }
    }
}

/// Labels: a list of ints, or an integer array.
fn int_list(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::List(items) | Value::Tuple(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect(),
        Value::Array(a) if a.shape.len() == 1 => a.to_i64(),
        _ => None,
    }
}

fn read_pickle_batch(path: &Path, kind: Kind) -> Result<(Vec<u8>, Vec<usize>)> {
    let d = pickle_dict(path)?;
    let label_key = match kind {
        Kind::Cifar10 => "labels",
        Kind::Cifar100 => "fine_labels",
    };
    let data = entry(&d, "data").ok_or_else(|| Error::format(path, "no 'data' entry"))?;
    let Value::Array(a) = data else {
        return Err(Error::format(
            path,
            format!("'data' is not a numpy array but {}", describe(data)),
        ));
    };
    let n = a.shape.first().copied().unwrap_or(0);
    let row: usize = a.shape.iter().skip(1).product();
    if a.dtype.trim_start_matches(['<', '>', '|', '=']) != "u1"
        || a.shape.len() < 2
        || row != IMAGE_BYTES
        || (a.fortran_order && a.shape.iter().filter(|&&s| s > 1).count() > 1)
    {
        return Err(Error::format(
            path,
            format!(
                "'data' is a {} array of shape {:?}{}, expected uint8 [N, {IMAGE_BYTES}]",
                a.dtype,
                a.shape,
                if a.fortran_order {
                    " in Fortran order"
                } else {
                    ""
                }
            ),
        ));
    }
    let lv = entry(&d, label_key)
        .ok_or_else(|| Error::format(path, format!("no '{label_key}' entry")))?;
    let labels = int_list(lv).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "'{label_key}' is not a list of integers but {}",
                describe(lv)
            ),
        )
    })?;
    if labels.len() != n {
        return Err(Error::format(
            path,
            format!("{} labels for {n} images", labels.len()),
        ));
    }
    let labels = labels
        .into_iter()
        .map(|l| {
            usize::try_from(l).map_err(|_| Error::format(path, format!("label {l} is negative")))
        })
        .collect::<Result<_>>()?;
    Ok((a.data.to_vec(), labels))
}

fn read_binary_batch(path: &Path, kind: Kind) -> Result<(Vec<u8>, Vec<usize>)> {
    let data = read(path)?;
    let head = match kind {
        Kind::Cifar10 => 1,
        Kind::Cifar100 => 2,
    };
    let rec = head + IMAGE_BYTES;
    if data.is_empty() || data.len() % rec != 0 {
        return Err(Error::format(
            path,
            format!(
                "truncated record: {} bytes is {} whole {rec}-byte records and {} bytes over",
                data.len(),
                data.len() / rec,
                data.len() % rec
            ),
        ));
    }
    let n = data.len() / rec;
    let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for r in data.chunks_exact(rec) {
        // CIFAR-100 records: coarse label, fine label, pixels.
        labels.push(r[head - 1] as usize);
        pixels.extend_from_slice(&r[head..]);
    }
    Ok((pixels, labels))
}

fn check_names(path: &Path, names: Vec<String>, kind: Kind) -> Result<Vec<String>> {
    if names.len() != kind.classes() {
        return Err(Error::format(
            path,
            format!(
                "{} class names, {} has {}",
                names.len(),
                kind.name(),
                kind.classes()
            ),
        ));
    }
    Ok(names)
}

fn pickle_names(path: &Path, kind: Kind) -> Result<Vec<String>> {
    let d = pickle_dict(path)?;
    let key = match kind {
        Kind::Cifar10 => "label_names",
        Kind::Cifar100 => "fine_label_names",
    };
    let v = entry(&d, key).ok_or_else(|| Error::format(path, format!("no '{key}' entry")))?;
    let names = match v {
        Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Str(s) => Some(s.clone()),
                Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or_else(|| Error::format(path, format!("'{key}' is not a list of strings")))?;
    check_names(path, names, kind)
}

/// One name a line; blank lines (the files end with some) are dropped.
fn text_names(path: &Path, kind: Kind) -> Result<Vec<String>> {
    let data = read(path)?;
    let text = String::from_utf8_lossy(&data);
    let names = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    check_names(path, names, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse_spec("cifar10:/d/x@test").unwrap().unwrap();
        assert_eq!((s.kind, s.split), (Kind::Cifar10, Split::Test));
        assert_eq!(s.dir, PathBuf::from("/d/x"));
        let s = parse_spec("cifar100:a@b/c").unwrap().unwrap();
        assert_eq!((s.kind, s.split), (Kind::Cifar100, Split::Train));
        assert_eq!(s.dir, PathBuf::from("a@b/c"));
        assert!(parse_spec("cifar10:d@val").unwrap().is_err());
        assert!(parse_spec("cifar10:@test").unwrap().is_err());
        assert!(parse_spec("cifar1000:d").is_none());
        assert!(parse_spec("/data/cifar10").is_none());
    }
}
