//! The one grammar of `--data` and `--val` (extract, pretrain, finetune): what a spec names,
//! parsed once into a typed value that the readers then open.
//!
//! ```text
//! digits[:CLASSES][@train|@test]      the bundled digits (CLASSES e.g. 0-4 or 0,2,5-7)
//! cifar10:DIR[@train|@test]           CIFAR-10 (python or binary version) under DIR
//! cifar100:DIR[@train|@test]          CIFAR-100 likewise
//! DIR                                 an image folder (class sub-folders, or flat)
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A part of the digits' fixed train/test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigitsPart {
    Train,
    Test,
}

/// What a data spec names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// The bundled digits of `classes` (sorted, each once); `part` None = both parts.
    Digits {
        classes: Vec<usize>,
        part: Option<DigitsPart>,
    },
    Cifar(crate::data::cifar::Spec),
    Folder(PathBuf),
}

impl DataSpec {
    /// Parses `spec`. A spec that names no data set is a folder only if that directory exists;
    /// otherwise the error says which of the two it looked like.
    pub fn parse(spec: &str) -> Result<DataSpec> {
        if spec == "digits" || spec.starts_with("digits:") || spec.starts_with("digits@") {
            let (body, part) = match spec.split_once('@') {
                Some((s, p)) => (s, Some(p)),
                None => (spec, None),
            };
            let (_, classes) = body.split_once(':').unwrap_or((body, ""));
            let classes = crate::data::digits::parse_classes(classes)?;
            let part = match part {
                None => None,
                Some("train") => Some(DigitsPart::Train),
                Some("test") => Some(DigitsPart::Test),
                Some(p) => {
                    return Err(Error::Usage(format!(
                        "digits@{p}: the digits have `train` and `test` parts"
                    )))
                }
            };
            return Ok(DataSpec::Digits { classes, part });
        }
        if let Some(cifar) = crate::data::cifar::parse_spec(spec) {
            return Ok(DataSpec::Cifar(cifar?));
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(DataSpec::Folder(path.to_path_buf()));
        }
        if spec.contains('/') || path.exists() {
            return Err(Error::Usage(format!("--data {spec}: no such directory")));
        }
        Err(Error::Usage(format!(
            "--data `{spec}`: not a directory or a known data set (digits[:CLASSES][@train|@test], \
             cifar10:DIR[@train|@test], cifar100:DIR[@train|@test])"
        )))
    }
}
