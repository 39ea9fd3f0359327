//! Image files on disk: an ImageFolder (class sub-folders, label = index of the sorted sub-folder
//! name, as torchvision's ImageFolder) or a flat folder of unlabelled images, and the decoder that
//! turns one file into 8-bit RGB the way PIL's `Image.open(p).convert('RGB')` does.
//!
//! Listing is strict (a missing or empty folder is an error: nothing can be done), decoding is
//! per item (one corrupt file among a million must not stop an extraction run; the caller skips
//! it with a warning that names the file).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Extensions read, compared case-insensitively (`.JPG` from cameras is common).
const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// A decoded image: 8-bit RGB, row-major, `width * height * 3` bytes.
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// The files of a folder, in a fixed order, with their labels.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Sorted class sub-folder names; empty for a flat folder.
    pub classes: Vec<String>,
    /// (file, label) in the order every run sees; the label is `None` for a flat folder.
    pub items: Vec<(PathBuf, Option<usize>)>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Sub-folders and image files directly under `dir`, each sorted by name.
fn list_dir(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        // metadata() follows symlinks, as torchvision's os.walk(followlinks=True) does.
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            dirs.push(path);
        } else if meta.is_file() && is_image(&path) {
            files.push(path);
        }
    }
    // Byte order of the names, the same as Python's sorted() on str for UTF-8 names.
    dirs.sort();
    files.sort();
    Ok((dirs, files))
}

/// Every image under `dir`, recursively: a folder's own files before its sub-folders', each
/// sorted, so the order does not depend on the file system.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let (dirs, files) = list_dir(dir)?;
    out.extend(files);
    for d in dirs {
        walk(&d, out)?;
    }
    Ok(())
}

impl ImageFolder {
    /// Lists `root`. With sub-folders it is a labelled set (one class per sub-folder, images found
    /// recursively, files directly in `root` ignored); without, a flat unlabelled set.
    pub fn open(root: &Path) -> Result<Self> {
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        if !meta.is_dir() {
            return Err(Error::format(root, "not a directory"));
        }
        let (dirs, files) = list_dir(root)?;
        let mut classes = Vec::new();
        let mut items = Vec::new();
        if dirs.is_empty() {
            items.extend(files.into_iter().map(|f| (f, None)));
        } else {
            for (label, d) in dirs.iter().enumerate() {
                classes.push(
                    d.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                let mut found = Vec::new();
                walk(d, &mut found)?;
                items.extend(found.into_iter().map(|f| (f, Some(label))));
            }
        }
        if items.is_empty() {
            return Err(Error::format(
                root,
                "no .jpg/.jpeg/.png images found (expected class sub-folders or image files)",
            ));
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes,
            items,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.items.iter().map(|(p, _)| p.clone()).collect()
    }
}

/// Reads and decodes one image file into RGB.
pub fn decode_file(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes, path)
}

/// Decodes JPEG or PNG bytes (by content, as PIL does, so a PNG named .jpg still loads) into
/// RGB: greyscale is replicated, alpha dropped without compositing, CMYK converted; `path` only
/// names the file in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::format(path, "empty file (0 bytes)"));
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (image::ImageFormat::Jpeg | image::ImageFormat::Png)) => f,
        Ok(other) => {
            return Err(Error::format(
                path,
                format!("{other:?} images are not supported (only JPEG and PNG)"),
            ))
        }
        Err(_) => {
            let head: String = bytes
                .iter()
                .take(8)
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            return Err(Error::format(
                path,
                format!("not a JPEG or PNG image (starts with {head:?})"),
            ));
        }
    };
    // The JPEG decoder fills a cut-off scan with grey instead of failing; PIL refuses such a
    // file ("image file is truncated"), and so do we: a JPEG ends with its EOI marker, possibly
    // followed by a little padding.
    if format == image::ImageFormat::Jpeg {
        let tail = &bytes[bytes.len().saturating_sub(64)..];
        if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
            return Err(Error::format(
                path,
                "truncated JPEG (no end-of-image marker)",
            ));
        }
    }
    let img = image::load_from_memory_with_format(bytes, format).map_err(|e| {
        Error::format(
            path,
            format!("cannot decode {format:?}: {e} (truncated or corrupt?)"),
        )
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(Error::format(path, "image has zero width or height"));
    }
    // into_rgb8 converts in place where it can (to_rgb8 would copy every image once more).
    let pixels = img.into_rgb8().into_raw();
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}
