//! Data specs opened: `--data` / `--val` parsed once (data::spec::DataSpec) and turned into an
//! extraction source (`open_source`, for `mood extract`) or into training images in memory
//! (`training_data`, `heldout_data`, for `mood pretrain` / `mood finetune`; `mode_training_data`
//! for `mood mode-train`).

use crate::data::spec::{DataSpec, DigitsPart};
use crate::error::{Error, Result};
use crate::extract::{source, Source};
use crate::model::VitConfig;
use crate::train::loops::Dataset;

/// The source a data spec names, read through `preset` at `img_size`, with the preprocessing's
/// description for the store's manifest.
pub fn open_source(spec: &str, preset: &str, img_size: usize) -> Result<(Box<dyn Source>, String)> {
    open(DataSpec::parse(spec)?, preset, img_size)
}

/// `open_source` of a parsed spec.
pub fn open(spec: DataSpec, preset: &str, img_size: usize) -> Result<(Box<dyn Source>, String)> {
    match spec {
        DataSpec::Digits { classes, part } => Ok((
            Box::new(source::Digits::new(&classes, part, img_size)?),
            "digits: 8x8 nearest-upsampled, mean/std 0.5".into(),
        )),
        DataSpec::Cifar(cifar) => {
            let s = source::Cifar::open(&cifar, preset, img_size)?;
            let p = crate::data::Preprocess::preset(preset, img_size)?;
            Ok((Box::new(s), format!("{preset}: {p:?}")))
        }
        DataSpec::Folder(path) => {
            let s = source::Folder::open(&path, preset, img_size)?;
            let p = crate::data::Preprocess::preset(preset, img_size)?;
            Ok((Box::new(s), format!("{preset}: {p:?}")))
        }
    }
}

/// Training images from a data spec: `digits[:CLASSES]` (the train part of the bundled digits'
/// fixed split, rendered at the model's input size), or anything `mood extract --data` reads (an
/// image folder with class sub-folders, `cifar10:DIR@train`, ...) through `preset`, loaded into
/// memory once. Also returns the number of classes the data names (None for the digits, whose
/// head keeps the preset's 10).
pub fn training_data(
    spec: &str,
    preset: &str,
    cfg: &VitConfig,
    need_labels: bool,
) -> Result<(Dataset, Option<usize>)> {
    let parsed = DataSpec::parse(spec)?;
    if let DataSpec::Digits {
        classes,
        part: None,
    } = &parsed
    {
        return Ok((digits_part(classes, cfg, DigitsPart::Train)?, None));
    }
    let (source, _) = open(parsed, preset, cfg.img_size)?;
    let classes = source.classes().len();
    Ok((
        load_all(spec, source.as_ref(), &vit_shape(cfg), need_labels)?,
        (classes > 0).then_some(classes),
    ))
}

/// The held-out images to report accuracy on: `--val SPEC` when given, else the digits' test
/// part for a `digits[:CLASSES]` spec, else none. (A digits spec naming its part, `@train` or
/// `@test`, is read as that part, like a folder.)
pub fn heldout_data(
    spec: &str,
    val: Option<&str>,
    preset: &str,
    cfg: &VitConfig,
) -> Result<Option<Dataset>> {
    let Some(v) = val else {
        return match DataSpec::parse(spec)? {
            DataSpec::Digits {
                classes,
                part: None,
            } => Ok(Some(digits_part(&classes, cfg, DigitsPart::Test)?)),
            _ => Ok(None),
        };
    };
    match DataSpec::parse(v)? {
        DataSpec::Digits {
            classes,
            part: None,
        } => Ok(Some(digits_part(&classes, cfg, DigitsPart::Test)?)),
        parsed => {
            let (source, _) = open(parsed, preset, cfg.img_size)?;
            Ok(Some(load_all(v, source.as_ref(), &vit_shape(cfg), true)?))
        }
    }
}

/// What `load_all` needs of a model: its name and input shape.
struct InputShape<'a> {
    name: &'a str,
    in_chans: usize,
    img_size: usize,
}

fn vit_shape(cfg: &VitConfig) -> InputShape<'_> {
    InputShape {
        name: &cfg.name,
        in_chans: cfg.in_chans,
        img_size: cfg.img_size,
    }
}

/// MODE's training images (`mood mode-train --data`) for a ResNet `cfg`, with the per-channel
/// mean and std they are normalised with: a digits spec as `mode::digits_data` renders it
/// (mean/std ½), anything else `training_data` reads through the `cifar` preset (MODE's
/// Resize((S, S)) bilinear and CIFAR statistics), every image labelled.
pub fn mode_training_data(
    spec: &str,
    cfg: &crate::model::resnet::ResNetConfig,
) -> Result<(Dataset, [f32; 3], [f32; 3])> {
    use crate::data::preprocess::HALF;
    let parsed = DataSpec::parse(spec)?;
    if let DataSpec::Digits { .. } = parsed {
        return Ok((
            crate::train::mode::digits_data(spec, cfg.img_size)?,
            HALF,
            HALF,
        ));
    }
    let p = crate::data::Preprocess::preset("cifar", cfg.img_size)?;
    let (source, _) = open(parsed, "cifar", cfg.img_size)?;
    let shape = InputShape {
        name: &cfg.name,
        in_chans: cfg.in_chans,
        img_size: cfg.img_size,
    };
    Ok((
        load_all(spec, source.as_ref(), &shape, true)?,
        p.mean,
        p.std,
    ))
}

/// Training keeps its images in memory (random order every epoch); beyond this it asks for a
/// smaller set instead of swapping.
const MAX_IN_MEMORY: usize = 16 << 30;

/// Every readable image of `source` with its label, decoded and preprocessed in parallel;
/// unreadable files are skipped with a warning, as `mood extract` does. Without `need_labels`,
/// unlabelled images (a flat folder) get label 0.
fn load_all(
    spec: &str,
    source: &dyn Source,
    cfg: &InputShape,
    need_labels: bool,
) -> Result<Dataset> {
    let (n, sample) = (source.len(), source.sample_len());
    if n == 0 {
        return Err(Error::Usage(format!("--data {spec}: no images")));
    }
    if sample != cfg.in_chans * cfg.img_size * cfg.img_size {
        return Err(Error::Usage(format!(
            "--data {spec} gives {sample}-value images, {} takes {}x{}x{}",
            cfg.name, cfg.in_chans, cfg.img_size, cfg.img_size
        )));
    }
    if n.saturating_mul(sample * 4) > MAX_IN_MEMORY {
        return Err(Error::Usage(format!(
            "--data {spec}: {n} images of {sample} floats need {:.1} GiB in memory, over the {} GiB \
             training holds; train on a subset (a smaller folder)",
            (n * sample * 4) as f64 / (1u64 << 30) as f64,
            MAX_IN_MEMORY >> 30
        )));
    }
    let pb = crate::progress::Progress::new(n as u64, "images", "loading");
    let (mut images, mut labels) = (Vec::with_capacity(n * sample), Vec::with_capacity(n));
    let rows: Vec<usize> = (0..n).collect();
    for batch in rows.chunks(64) {
        let mut buf = vec![0f32; batch.len() * sample];
        let results = source.load(batch, &mut buf);
        for ((&r, res), img) in batch.iter().zip(results).zip(buf.chunks_exact(sample)) {
            if let Err(e) = res {
                pb.suspend(|| eprintln!("warning: skipping {}: {e}", source.item_name(r)));
                continue;
            }
            let label = source
                .label(r)
                .or((!need_labels).then_some(0))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--data {spec}: {} has no label; fine-tuning needs class sub-folders",
                        source.item_name(r)
                    ))
                })?;
            images.extend_from_slice(img);
            labels.push(label);
        }
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    Ok(Dataset {
        images,
        chw: [cfg.in_chans, cfg.img_size, cfg.img_size],
        labels,
    })
}

fn digits_part(classes: &[usize], cfg: &VitConfig, part: DigitsPart) -> Result<Dataset> {
    if cfg.img_size % 8 != 0 || cfg.in_chans != 3 {
        return Err(Error::Usage(format!(
            "{} takes {}x{} inputs; the digits render at multiples of 8 with 3 channels",
            cfg.name, cfg.img_size, cfg.img_size
        )));
    }
    let d = crate::data::digits::load()?;
    let test = part == DigitsPart::Test;
    let (images, labels) = crate::data::digits::split(&d, classes, test, cfg.img_size);
    Ok(Dataset {
        images,
        chw: [3, cfg.img_size, cfg.img_size],
        labels,
    })
}
