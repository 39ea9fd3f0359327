//! One error type for the library. Every variant carries what a user needs to fix the problem:
//! the file, the tensor key or the option at fault. The binary prints it on one line.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A weights or data file that could not be parsed (truncated, wrong format, ...).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("tensor `{name}`: expected shape {expected:?}, found {got:?}{}", in_file(.file))]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
        file: Option<PathBuf>,
    },
    #[error("tensor `{name}` is missing{}{}", in_file(.file), fmt_hint(.hint))]
    MissingTensor {
        name: String,
        file: Option<PathBuf>,
        hint: String,
    },
    /// A bad command-line value or combination of options.
    #[error("{0}")]
    Usage(String),
    /// Input data that cannot be used (NaN rows, wrong dtype, empty set, ...).
    #[error("{0}")]
    Data(String),
    /// The CUDA backend is unavailable or failed.
    #[error("cuda: {0}")]
    Cuda(String),
    /// A device allocation failed with CUDA_ERROR_OUT_OF_MEMORY (what was being allocated). The
    /// CUDA forward turns it into a message naming a batch that fits.
    #[error("cuda: out of GPU memory ({0}): free GPU memory, or use a smaller batch or model")]
    CudaOutOfMemory(String),
}

fn in_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

fn fmt_hint(h: &str) -> String {
    if h.is_empty() {
        String::new()
    } else {
        format!(" ({h})")
    }
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Shorthand for a usage error built with `format!`.
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => { $crate::error::Error::Usage(format!($($arg)*)) };
}

/// Shorthand for a data error built with `format!`.
#[macro_export]
macro_rules! data_err {
    ($($arg:tt)*) => { $crate::error::Error::Data(format!($($arg)*)) };
}
