//! Evaluation preprocessing presets (SPEC B) reproducing torchvision's PIL-backed transforms:
//! `Resize` (antialiased bicubic or bilinear), `CenterCrop`, `ToTensor`, `Normalize`. The output
//! is CHW f32 written straight into a slot of the caller's batch buffer.
//!
//! The resize is Pillow's own fixed-point arithmetic (`resample.rs`), bit for bit, with the centre
//! crop folded in so only the kept pixels are computed. (fast_image_resize's convolution was
//! tried first: it rounds apart from Pillow by up to 5 levels on bicubic edges.)

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::image_folder::{decode_file, RgbImage};
use super::resample::{resize_rgb, Filter, Scratch, Window};
use crate::error::{Error, Result};

/// timm's IMAGENET_INCEPTION constants, BEiT's and MOOD's default.
pub const HALF: [f32; 3] = [0.5, 0.5, 0.5];
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The CIFAR statistics MODE uses for both CIFAR-10 and CIFAR-100.
pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2023, 0.1994, 0.2010];

pub const PRESETS: [&str; 4] = ["mood", "moodv2", "imagenet", "cifar"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interp {
    /// PIL BICUBIC (Keys cubic, a = -0.5).
    Bicubic,
    /// PIL BILINEAR (triangle), torchvision's default.
    Bilinear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// `Resize(n)`: the shorter side to n, the longer to int(n * long / short).
    Shorter(usize),
    /// `Resize((n, n))`: both sides to n, aspect ratio not kept.
    Square(usize),
}

/// One evaluation pipeline: resize, optional centre crop, normalise.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub resize: Resize,
    pub interp: Interp,
    /// Side of the centre crop; `None` keeps the resized image (it must then be square).
    pub crop: Option<usize>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// timm's rule: resize to int(size / crop_pct) with crop_pct = 0.875, except for inputs of 384
/// and more, which MOOD v1 evaluates with crop_pct = 1.
fn resize_for_crop(img_size: usize) -> usize {
    if img_size >= 384 {
        img_size
    } else {
        (img_size as f64 / 0.875) as usize
    }
}

impl Preprocess {
    /// The named preset (SPEC Part 1) for a model taking `img_size`×`img_size` inputs.
    pub fn preset(name: &str, img_size: usize) -> Result<Self> {
        if img_size == 0 {
            return Err(Error::Usage("image size must be positive".into()));
        }
        let p = match name {
            "mood" => Preprocess {
                resize: Resize::Shorter(resize_for_crop(img_size)),
                interp: Interp::Bicubic,
                crop: Some(img_size),
                mean: HALF,
                std: HALF,
            },
            "moodv2" => Preprocess {
                resize: Resize::Square(img_size),
                interp: Interp::Bilinear,
                crop: None,
                mean: HALF,
                std: HALF,
            },
            "imagenet" => Preprocess {
                resize: Resize::Shorter(resize_for_crop(img_size)),
                interp: Interp::Bicubic,
                crop: Some(img_size),
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
            // MODE: Resize((32, 32)), CenterCrop(32), CIFAR statistics; torchvision's bilinear.
            "cifar" => Preprocess {
                resize: Resize::Square(img_size),
                interp: Interp::Bilinear,
                crop: Some(img_size),
                mean: CIFAR_MEAN,
                std: CIFAR_STD,
            },
            other => {
                return Err(Error::Usage(format!(
                    "unknown preprocessing preset `{other}` (expected one of {})",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(p)
    }

    /// Side of the square output.
    pub fn out_size(&self) -> usize {
        match (self.crop, self.resize) {
            (Some(c), _) => c,
            (None, Resize::Square(n)) | (None, Resize::Shorter(n)) => n,
        }
    }

    /// f32 values per image: 3 × side × side.
    pub fn sample_len(&self) -> usize {
        3 * self.out_size() * self.out_size()
    }

    /// The size torchvision's Resize gives a `w`×`h` image, as (width, height).
    pub fn resized_size(&self, w: usize, h: usize) -> (usize, usize) {
        match self.resize {
            Resize::Square(n) => (n, n),
            Resize::Shorter(n) => {
                // int(n * long / short) in double precision, as torchvision computes it.
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (n as f64 * long as f64 / short as f64) as usize;
                if w <= h {
                    (n, new_long)
                } else {
                    (new_long, n)
                }
            }
        }
    }

    /// Resize, crop and normalise `img` into `out` (`sample_len()` values, CHW).
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) -> Result<()> {
        let s = self.out_size();
        if out.len() != self.sample_len() {
            return Err(Error::Data(format!(
                "preprocess: output slot holds {} values, expected {}",
                out.len(),
                self.sample_len()
            )));
        }
        let (rw, rh) = self.resized_size(img.width, img.height);
        let (cw, ch) = match self.crop {
            Some(c) => (c, c),
            None => (rw, rh),
        };
        if cw != s || ch != s || cw > rw || ch > rh {
            return Err(Error::Data(format!(
                "preprocess: a {}x{} image resized to {rw}x{rh} cannot give a {s}x{s} crop",
                img.width, img.height
            )));
        }
        // torchvision's CenterCrop: int(round((size - crop) / 2)), Python's round (half to even).
        let left = round_half_even((rw - cw) as f64 / 2.0);
        let top = round_half_even((rh - ch) as f64 / 2.0);
        let mut rgb = vec![0u8; s * s * 3];
        if (rw, rh) == (img.width, img.height) {
            // torchvision returns the image unchanged when it already has the size.
            for y in 0..s {
                let src = ((top + y) * img.width + left) * 3;
                rgb[y * s * 3..(y + 1) * s * 3].copy_from_slice(&img.pixels[src..src + s * 3]);
            }
        } else {
            let win = Window {
                full: (rw, rh),
                left,
                top,
                width: s,
                height: s,
            };
            let filter = match self.interp {
                Interp::Bicubic => Filter::Bicubic,
                Interp::Bilinear => Filter::Bilinear,
            };
            SCRATCH.with(|sc| {
                let dims = (img.width, img.height);
                resize_rgb(
                    &img.pixels,
                    dims,
                    win,
                    filter,
                    &mut sc.borrow_mut(),
                    &mut rgb,
                )
            });
        }
        normalise(&rgb, s, &self.mean, &self.std, out);
        Ok(())
    }

    /// Decodes `path` and preprocesses it into `out`.
    pub fn apply_file(&self, path: &Path, out: &mut [f32]) -> Result<()> {
        let img = decode_file(path)?;
        self.apply(&img, out)
            .map_err(|e| Error::format(path, e.to_string()))
    }
}

fn round_half_even(x: f64) -> usize {
    let r = x.round_ties_even();
    r.max(0.0) as usize
}

thread_local! {
    // Resize scratch rows, one set per worker thread, so images do not reallocate them.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// ToTensor then Normalize, in the same f32 operations as torch ((v / 255 − mean) / std), through
/// a 256-entry table per channel; HWC bytes in, CHW floats out.
fn normalise(rgb: &[u8], s: usize, mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let plane = s * s;
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, l) in table.iter_mut().enumerate() {
            *l = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    // One pass over the pixels, writing the three planes together.
    let (r, gb) = out[..3 * plane].split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (((px, r), g), b) in rgb.chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = lut[0][px[0] as usize];
        *g = lut[1][px[1] as usize];
        *b = lut[2][px[2] as usize];
    }
}

/// Decodes and preprocesses `paths` in parallel into `out` (`paths.len() × sample_len()` values,
/// one CHW image after the other). Each image gets its own result: a file that fails leaves its
/// slot zeroed and the caller decides (skip with a warning, or stop). `threads` = 0 uses the
/// current rayon pool, otherwise a pool of that many threads for this call.
pub fn preprocess_batch(
    paths: &[PathBuf],
    pre: &Preprocess,
    threads: usize,
    out: &mut [f32],
) -> Result<Vec<Result<()>>> {
    let n = pre.sample_len();
    if out.len() != paths.len() * n {
        return Err(Error::Data(format!(
            "preprocess_batch: buffer holds {} values, {} images need {}",
            out.len(),
            paths.len(),
            paths.len() * n
        )));
    }
    let work = |out: &mut [f32]| -> Vec<Result<()>> {
        paths
            .par_iter()
            .zip(out.par_chunks_mut(n))
            .map(|(p, slot)| {
                let r = pre.apply_file(p, slot);
                if r.is_err() {
                    slot.fill(0.0);
                }
                r
            })
            .collect()
    };
    if threads == 0 {
        Ok(work(out))
    } else {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Data(format!("thread pool: {e}")))?;
        Ok(pool.install(|| work(out)))
    }
}
