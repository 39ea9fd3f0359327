//! Where extraction reads images from: the bundled digits, images in memory, or an image folder /
//! CIFAR through the data readers. A source hands out preprocessed images (CHW, normalised) by
//! row index.

use crate::error::{Error, Result};

pub trait Source: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values per preprocessed image (C·H·W).
    fn sample_len(&self) -> usize;
    /// A name for messages and the manifest (a path, or `digits[17]`).
    fn item_name(&self, i: usize) -> String;
    /// The name of row `i` in the listing whose hash identifies the source: independent of where
    /// the data set is mounted, so that shards run on machines with other mount points agree.
    fn listing_name(&self, i: usize) -> String {
        self.item_name(i)
    }
    fn label(&self, i: usize) -> Option<usize>;
    fn classes(&self) -> Vec<String>;
    /// Preprocessed images of `rows` into `out` (rows.len() × sample_len()), one result each: a
    /// row that fails is skipped by the caller.
    fn load(&self, rows: &[usize], out: &mut [f32]) -> Vec<Result<()>>;
}

/// (rows, SHA-256 of the listing: each row's listing name and label, then the class names).
pub fn listing(source: &dyn Source) -> (usize, String) {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for i in 0..source.len() {
        let label = source.label(i).map_or(-1, |l| l as i64);
        h.update(format!("{}\t{label}\n", source.listing_name(i)).as_bytes());
    }
    for c in source.classes() {
        h.update(format!("class\t{c}\n").as_bytes());
    }
    (source.len(), format!("{:x}", h.finalize()))
}

/// The bundled digits (`digits[:CLASSES][@train|@test]`), rendered at the model's input size.
pub struct Digits {
    images: Vec<f32>,
    labels: Vec<usize>,
    sample: usize,
    names: Vec<String>,
}

impl Digits {
    /// The digits a `digits[:CLASSES][@train|@test]` spec names (parsed by data::spec).
    pub fn parse(spec: &str, img_size: usize) -> Result<Digits> {
        match crate::data::spec::DataSpec::parse(spec)? {
            crate::data::spec::DataSpec::Digits { classes, part } => {
                Digits::new(&classes, part, img_size)
            }
            _ => Err(Error::Usage(format!(
                "--data `{spec}`: not digits[:CLASSES][@train|@test]"
            ))),
        }
    }

    /// `classes` of the digits (empty = all), of one part or (None) both, at `img_size`.
    pub fn new(
        classes: &[usize],
        part: Option<crate::data::spec::DigitsPart>,
        img_size: usize,
    ) -> Result<Digits> {
        use crate::data::spec::DigitsPart;
        if img_size % 8 != 0 {
            return Err(Error::Usage(format!(
                "the digits render at multiples of 8 pixels, not {img_size}"
            )));
        }
        let d = crate::data::digits::load()?;
        let parts: Vec<bool> = match part {
            None => vec![false, true],
            Some(DigitsPart::Train) => vec![false],
            Some(DigitsPart::Test) => vec![true],
        };
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for test in parts {
            let (i, l) = crate::data::digits::split(&d, classes, test, img_size);
            images.extend(i);
            labels.extend(l);
        }
        let names = (0..labels.len()).map(|i| format!("digits[{i}]")).collect();
        Ok(Digits {
            images,
            labels,
            sample: 3 * img_size * img_size,
            names,
        })
    }
}

impl Source for Digits {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn sample_len(&self) -> usize {
        self.sample
    }
    fn item_name(&self, i: usize) -> String {
        self.names[i].clone()
    }
    fn label(&self, i: usize) -> Option<usize> {
        Some(self.labels[i])
    }
    fn classes(&self) -> Vec<String> {
        (0..=self.labels.iter().copied().max().unwrap_or(0))
            .map(|c| c.to_string())
            .collect()
    }
    fn load(&self, rows: &[usize], out: &mut [f32]) -> Vec<Result<()>> {
        rows.iter()
            .zip(out.chunks_exact_mut(self.sample))
            .map(|(&r, slot)| {
                slot.copy_from_slice(&self.images[r * self.sample..(r + 1) * self.sample]);
                Ok(())
            })
            .collect()
    }
}

/// Images already preprocessed in memory (the demo's sets), rows named `NAME[i]`; labelled or
/// not.
pub struct InMemory<'a> {
    images: &'a [f32],
    labels: Option<&'a [usize]>,
    sample: usize,
    name: String,
}

impl<'a> InMemory<'a> {
    /// `images` holds whole samples of `sample` values; `labels`, when given, one per sample.
    pub fn new(
        name: &str,
        images: &'a [f32],
        labels: Option<&'a [usize]>,
        sample: usize,
    ) -> Result<InMemory<'a>> {
        let rows = images.len() / sample.max(1);
        if sample == 0 || images.len() % sample != 0 || labels.is_some_and(|l| l.len() != rows) {
            return Err(Error::Data(format!(
                "{name}: {} values are not whole images of {sample} with one label each",
                images.len()
            )));
        }
        Ok(InMemory {
            images,
            labels,
            sample,
            name: name.to_string(),
        })
    }
}

impl Source for InMemory<'_> {
    fn len(&self) -> usize {
        self.images.len() / self.sample
    }
    fn sample_len(&self) -> usize {
        self.sample
    }
    fn item_name(&self, i: usize) -> String {
        format!("{}[{i}]", self.name)
    }
    fn label(&self, i: usize) -> Option<usize> {
        self.labels.map(|l| l[i])
    }
    fn classes(&self) -> Vec<String> {
        match self.labels {
            Some(l) => (0..=l.iter().copied().max().unwrap_or(0))
                .map(|c| c.to_string())
                .collect(),
            None => Vec::new(),
        }
    }
    fn load(&self, rows: &[usize], out: &mut [f32]) -> Vec<Result<()>> {
        rows.iter()
            .zip(out.chunks_exact_mut(self.sample))
            .map(|(&r, slot)| {
                slot.copy_from_slice(&self.images[r * self.sample..(r + 1) * self.sample]);
                Ok(())
            })
            .collect()
    }
}

/// An image folder (class sub-folders or flat) through a preprocessing preset.
pub struct Folder {
    folder: crate::data::image_folder::ImageFolder,
    pre: crate::data::preprocess::Preprocess,
}

impl Folder {
    pub fn open(root: &std::path::Path, preset: &str, img_size: usize) -> Result<Folder> {
        Ok(Folder {
            folder: crate::data::image_folder::ImageFolder::open(root)?,
            pre: crate::data::preprocess::Preprocess::preset(preset, img_size)?,
        })
    }
}

impl Source for Folder {
    fn len(&self) -> usize {
        self.folder.items.len()
    }
    fn sample_len(&self) -> usize {
        self.pre.sample_len()
    }
    fn item_name(&self, i: usize) -> String {
        self.folder.items[i].0.display().to_string()
    }
    fn listing_name(&self, i: usize) -> String {
        let p = &self.folder.items[i].0;
        p.strip_prefix(&self.folder.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }
    fn label(&self, i: usize) -> Option<usize> {
        self.folder.items[i].1
    }
    fn classes(&self) -> Vec<String> {
        self.folder.classes.clone()
    }
    fn load(&self, rows: &[usize], out: &mut [f32]) -> Vec<Result<()>> {
        use rayon::prelude::*;
        let n = self.pre.sample_len();
        rows.par_iter()
            .zip(out.par_chunks_mut(n))
            .map(|(&r, slot)| self.pre.apply_file(&self.folder.items[r].0, slot))
            .collect()
    }
}

/// CIFAR-10/100 (`cifar10:DIR[@train|@test]`), either layout, through a preprocessing preset: the
/// 32×32 images take the same resize path as decoded image files.
pub struct Cifar {
    data: crate::data::cifar::Cifar,
    pre: crate::data::preprocess::Preprocess,
}

impl Cifar {
    pub fn open(spec: &crate::data::cifar::Spec, preset: &str, img_size: usize) -> Result<Cifar> {
        let pre = crate::data::preprocess::Preprocess::preset(preset, img_size)?;
        Ok(Cifar {
            data: crate::data::cifar::Cifar::open(&spec.dir, spec.kind, spec.split)?,
            pre,
        })
    }

    pub fn data(&self) -> &crate::data::cifar::Cifar {
        &self.data
    }
}

impl Source for Cifar {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn sample_len(&self) -> usize {
        self.pre.sample_len()
    }
    fn item_name(&self, i: usize) -> String {
        self.data.item_name(i)
    }
    fn listing_name(&self, i: usize) -> String {
        // The rows of a CIFAR batch file are fixed by the file: the position and label (hashed
        // with it) identify them.
        i.to_string()
    }
    fn label(&self, i: usize) -> Option<usize> {
        Some(self.data.labels[i])
    }
    fn classes(&self) -> Vec<String> {
        self.data.classes.clone()
    }
    fn load(&self, rows: &[usize], out: &mut [f32]) -> Vec<Result<()>> {
        use rayon::prelude::*;
        let n = self.pre.sample_len();
        rows.par_iter()
            .zip(out.par_chunks_mut(n))
            .map(|(&r, slot)| self.pre.apply(&self.data.image(r), slot))
            .collect()
    }
}
