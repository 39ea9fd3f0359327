//! The bundled UCI digits (1797 images, 8×8, intensities 0..16) and far-OOD crops of the two
//! bundled photographs, rendered as model inputs: each 8×8 image is scaled to [0, 1] (÷16),
//! upsampled by pixel repetition to S×S, copied to three channels and normalised with BEiT's
//! mean/std 0.5 (x ↦ 2x − 1). See data/README.md for the sources and licences.

use std::io::Read;

use crate::error::{Error, Result};

static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");
static CHINA_JPG: &[u8] = include_bytes!("../../data/china.jpg");
static FLOWER_JPG: &[u8] = include_bytes!("../../data/flower.jpg");

/// 8×8 images with intensities in 0..=16, row-major, and their labels.
pub struct Digits {
    pub pixels: Vec<[u8; 64]>,
    pub labels: Vec<usize>,
}

/// Decodes the embedded digits.
pub fn load() -> Result<Digits> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::format("<embedded digits.csv.gz>", e.to_string()))?;
    let mut out = Digits {
        pixels: Vec::new(),
        labels: Vec::new(),
    };
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<u8> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>().map(|f| f as u8))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| {
                Error::format("<embedded digits.csv.gz>", format!("line {}: {e}", i + 1))
            })?;
        if vals.len() != 65 {
            return Err(Error::format(
                "<embedded digits.csv.gz>",
                format!("line {}: {} values", i + 1, vals.len()),
            ));
        }
        let mut px = [0u8; 64];
        px.copy_from_slice(&vals[..64]);
        out.pixels.push(px);
        out.labels.push(vals[64] as usize);
    }
    Ok(out)
}

/// One 8×8 image (0..=16) as a normalised [3, S, S] input, S a multiple of 8.
pub fn render(px: &[u8; 64], size: usize) -> Vec<f32> {
    let rep = size / 8;
    let mut plane = vec![0.0f32; size * size];
    for y in 0..size {
        for x in 0..size {
            let v = px[(y / rep) * 8 + x / rep] as f32 / 16.0;
            plane[y * size + x] = (v - 0.5) / 0.5;
        }
    }
    let mut out = Vec::with_capacity(3 * size * size);
    for _ in 0..3 {
        out.extend_from_slice(&plane);
    }
    out
}

/// `count` far-OOD images cut from the bundled photographs: random square crops, converted to grey,
/// box-averaged to 8×8 and quantised to 0..=16, so they share the digits' format but not their
/// content. Deterministic for a seed.
pub fn photo_crops(count: usize, seed: u64) -> Result<Vec<[u8; 64]>> {
    let photos = [("china.jpg", CHINA_JPG), ("flower.jpg", FLOWER_JPG)]
        .iter()
        .map(|(name, bytes)| {
            image::load_from_memory(bytes)
                .map(|im| im.into_luma8())
                .map_err(|e| Error::format(format!("<embedded {name}>"), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rng = crate::rng::Rng::new(seed);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let img = &photos[i % photos.len()];
        let (w, h) = img.dimensions();
        let side = 32 + (rng.next_u64() % (h.min(w) as u64 / 2)) as u32;
        let x0 = (rng.next_u64() % (w - side) as u64) as u32;
        let y0 = (rng.next_u64() % (h - side) as u64) as u32;
        let mut px = [0u8; 64];
        for (cell, p) in px.iter_mut().enumerate() {
            let (cy, cx) = ((cell / 8) as u32, (cell % 8) as u32);
            let (ya, yb) = (y0 + cy * side / 8, y0 + (cy + 1) * side / 8);
            let (xa, xb) = (x0 + cx * side / 8, x0 + (cx + 1) * side / 8);
            let mut sum = 0u64;
            for y in ya..yb {
                for x in xa..xb {
                    sum += img.get_pixel(x, y).0[0] as u64;
                }
            }
            let mean = sum as f32 / ((yb - ya) * (xb - xa)).max(1) as f32;
            *p = (mean / 255.0 * 16.0).round() as u8;
        }
        out.push(px);
    }
    Ok(out)
}

/// `count` images of uniform noise in 0..=16.
pub fn noise(count: usize, seed: u64) -> Vec<[u8; 64]> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..count)
        .map(|_| {
            let mut px = [0u8; 64];
            px.iter_mut().for_each(|p| *p = (rng.next_u64() % 17) as u8);
            px
        })
        .collect()
}

/// The fixed train/test split: every third image (index % 3 == 0) is test, the rest train.
pub fn is_test(index: usize) -> bool {
    index % 3 == 0
}

/// Rendered images [n, 3, S, S] (flattened) of the given 8×8 images.
pub fn render_all(pixels: &[[u8; 64]], size: usize) -> Vec<f32> {
    pixels.iter().flat_map(|p| render(p, size)).collect()
}

/// The digits of `classes` (all when empty) in the train or test part of the fixed split, rendered
/// at `size`, with their labels.
pub fn split(d: &Digits, classes: &[usize], test: bool, size: usize) -> (Vec<f32>, Vec<usize>) {
    let keep: Vec<usize> = (0..d.labels.len())
        .filter(|&i| is_test(i) == test && (classes.is_empty() || classes.contains(&d.labels[i])))
        .collect();
    let px: Vec<[u8; 64]> = keep.iter().map(|&i| d.pixels[i]).collect();
    (
        render_all(&px, size),
        keep.iter().map(|&i| d.labels[i]).collect(),
    )
}

/// Parses a class list such as `0-4`, `3` or `0,2,5-7`.
pub fn parse_classes(spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let bad = || {
            Error::Usage(format!(
                "bad class list `{spec}`: use e.g. 0-4, 3 or 0,2,5-7 (digits 0..9)"
            ))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<usize>().map_err(|_| bad())?,
                b.parse::<usize>().map_err(|_| bad())?,
            ),
            None => {
                let v = part.parse::<usize>().map_err(|_| bad())?;
                (v, v)
            }
        };
        if a > b || b > 9 {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_have_1797_images_in_10_classes() {
        let d = load().unwrap();
        assert_eq!(d.pixels.len(), 1797);
        let mut counts = [0usize; 10];
        d.labels.iter().for_each(|&l| counts[l] += 1);
        assert!(
            counts.iter().all(|&c| (170..=190).contains(&c)),
            "{counts:?}"
        );
        assert!(d.pixels.iter().all(|p| p.iter().all(|&v| v <= 16)));
    }

    #[test]
    fn photo_crops_are_deterministic_and_in_range() {
        let a = photo_crops(5, 1).unwrap();
        assert_eq!(a, photo_crops(5, 1).unwrap());
        assert!(a.iter().all(|p| p.iter().all(|&v| v <= 16)));
        let r = render(&a[0], 32);
        assert_eq!(r.len(), 3 * 32 * 32);
        assert!(r.iter().all(|v| (-1.0..=1.0).contains(v)));
    }
}
