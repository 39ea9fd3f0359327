//! torchvision's colour augmentation on float images [C, H, W] with values in [0, 1]: the
//! functional ops of its tensor implementation, each a blend clamped to [0, 1],
//!   brightness b:  x ↦ clamp(b·x)
//!   contrast c:    x ↦ clamp(c·x + (1−c)·m),   m = mean over the image of grey(x)
//!   saturation s:  x ↦ clamp(s·x + (1−s)·grey(x))
//!   hue h:         RGB → HSV, H ↦ (H + h) mod 1, → RGB (torchvision's `_rgb2hsv`/`_hsv2rgb`)
//!   grey(x) = 0.2989·r + 0.587·g + 0.114·b   (rgb_to_grayscale, copied to every channel)
//! and the random transform MODE's training (after SupContrast) applies to each view:
//! RandomApply([ColorJitter(b, c, s, h)], p) then RandomGrayscale(p_grey). ColorJitter draws a
//! random order of its four ops and one factor each (b, c, s from [max(0, 1−v), 1+v], h from
//! [−v, v]; a 0 setting leaves that op out, as torchvision's None).
//!
//! Every op computes in f32 in torch's order (scalar factors rounded to f32 as torch's CPU kernels
//! do), so the outputs agree with torchvision's to rounding (tests/color_jitter.rs). One-channel
//! images: saturation, hue and grayscale leave them unchanged (torchvision's rule, "match PIL"),
//! and contrast blends with the plain mean.

use crate::rng::Rng;

/// rgb_to_grayscale's weights (ITU-R 601-2 luma as TensorFlow rounds them).
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// torchvision's `_blend`: ratio·x + (1−ratio)·y clamped to [0, 1], each product rounded to f32.
fn blend(x: f32, y: f32, ratio: f64) -> f32 {
    let (a, b) = (ratio as f32, (1.0 - ratio) as f32);
    (a * x + b * y).clamp(0.0, 1.0)
}

/// The grey value of every pixel of an RGB image [3, H, W] (the image itself when C is 1).
fn grey(img: &[f32], c: usize) -> Vec<f32> {
    if c != 3 {
        return img.to_vec();
    }
    let hw = img.len() / 3;
    let (r, g, b) = (&img[..hw], &img[hw..2 * hw], &img[2 * hw..]);
    (0..hw)
        .map(|i| LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i])
        .collect()
}

/// adjust_brightness: a blend with black.
pub fn adjust_brightness(img: &mut [f32], factor: f64) {
    for x in img {
        *x = blend(*x, 0.0, factor);
    }
}

/// adjust_contrast: a blend with the mean grey level of the image.
pub fn adjust_contrast(img: &mut [f32], c: usize, factor: f64) {
    let g = grey(img, c);
    let mean = (g.iter().map(|&v| v as f64).sum::<f64>() / g.len().max(1) as f64) as f32;
    for x in img {
        *x = blend(*x, mean, factor);
    }
}

/// adjust_saturation: a blend of each pixel with its grey value (none on one channel).
pub fn adjust_saturation(img: &mut [f32], c: usize, factor: f64) {
    if c != 3 {
        return;
    }
    let g = grey(img, c);
    let hw = g.len();
    for (i, x) in img.iter_mut().enumerate() {
        *x = blend(*x, g[i % hw], factor);
    }
}

/// rgb_to_grayscale with as many output channels as input ones (RandomGrayscale's call).
pub fn rgb_to_grayscale(img: &mut [f32], c: usize) {
    if c != 3 {
        return;
    }
    let g = grey(img, c);
    for plane in img.chunks_exact_mut(g.len()) {
        plane.copy_from_slice(&g);
    }
}

/// torchvision's `_rgb2hsv` of one pixel: (h, s, v) with h in [0, 1).
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
    // Exactly one of the three sectors counts (the masks are products with 0 or 1 in torch).
    let hr = if maxc == r { bc - gc } else { 0.0 };
    let hg = if maxc == g && maxc != r {
        2.0 + rc - bc
    } else {
        0.0
    };
    let hb = if maxc != g && maxc != r {
        4.0 + gc - rc
    } else {
        0.0
    };
    let h = hr + hg + hb;
    ((h / 6.0 + 1.0) % 1.0, s, maxc)
}

/// torchvision's `_hsv2rgb` of one pixel.
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (i as i32).rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// adjust_hue: the hue turned by `factor` (in [−½, ½]) of a full turn (none on one channel).
pub fn adjust_hue(img: &mut [f32], c: usize, factor: f64) {
    if c != 3 {
        return;
    }
    let hw = img.len() / 3;
    let shift = factor as f32;
    for i in 0..hw {
        let (h, s, v) = rgb_to_hsv(img[i], img[hw + i], img[2 * hw + i]);
        // torch's float `%` (remainder): fmod, moved into [0, 1) when negative.
        let mut h = (h + shift) % 1.0;
        if h < 0.0 {
            h += 1.0;
        }
        let rgb = hsv_to_rgb(h, s, v);
        for (k, x) in rgb.into_iter().enumerate() {
            img[k * hw + i] = x;
        }
    }
}

/// MODE's colour augmentation of a view; the settings record keeps these.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ColorAug {
    /// Probability of applying ColorJitter (MODE: 0.8).
    pub jitter_p: f32,
    /// ColorJitter's strengths (MODE: 0.4, 0.4, 0.4, 0.1); 0 leaves that op out.
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    /// Probability of RandomGrayscale (MODE: 0.2).
    pub grayscale_p: f32,
}

impl ColorAug {
    /// SupContrast's and MODE's: RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    /// RandomGrayscale(p=0.2).
    pub const MODE: ColorAug = ColorAug {
        jitter_p: 0.8,
        brightness: 0.4,
        contrast: 0.4,
        saturation: 0.4,
        hue: 0.1,
        grayscale_p: 0.2,
    };
    /// No colour augmentation.
    pub const OFF: ColorAug = ColorAug {
        jitter_p: 0.0,
        brightness: 0.0,
        contrast: 0.0,
        saturation: 0.0,
        hue: 0.0,
        grayscale_p: 0.0,
    };

    /// What one application does, drawn from `rng`: the jitter's ops in order with their
    /// factors (empty when it is not applied), and whether the image turns grey.
    pub fn draw(&self, rng: &mut Rng) -> (Vec<(Jitter, f64)>, bool) {
        let mut ops = Vec::new();
        if rng.uniform() < self.jitter_p as f64 {
            let mut order = [0usize, 1, 2, 3];
            for i in (1..4).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let around_one = |v: f32, u: f64| {
                let v = v as f64;
                let lo = (1.0 - v).max(0.0);
                lo + (1.0 + v - lo) * u
            };
            let factors = [
                (self.brightness > 0.0).then(|| around_one(self.brightness, rng.uniform())),
                (self.contrast > 0.0).then(|| around_one(self.contrast, rng.uniform())),
                (self.saturation > 0.0).then(|| around_one(self.saturation, rng.uniform())),
                (self.hue > 0.0).then(|| (self.hue as f64) * (2.0 * rng.uniform() - 1.0)),
            ];
            let kinds = [
                Jitter::Brightness,
                Jitter::Contrast,
                Jitter::Saturation,
                Jitter::Hue,
            ];
            for k in order {
                if let Some(f) = factors[k] {
                    ops.push((kinds[k], f));
                }
            }
        }
        let grey = rng.uniform() < self.grayscale_p as f64;
        (ops, grey)
    }

    /// Applies one random draw to `img` [C, H, W] in [0, 1]; false when it left it unchanged
    /// (nothing drawn), so the caller may skip un- and re-normalising.
    pub fn apply(&self, img: &mut [f32], c: usize, rng: &mut Rng) -> bool {
        let (ops, grey) = self.draw(rng);
        for &(op, f) in &ops {
            match op {
                Jitter::Brightness => adjust_brightness(img, f),
                Jitter::Contrast => adjust_contrast(img, c, f),
                Jitter::Saturation => adjust_saturation(img, c, f),
                Jitter::Hue => adjust_hue(img, c, f),
            }
        }
        if grey {
            rgb_to_grayscale(img, c);
        }
        !ops.is_empty() || grey
    }
}

/// ColorJitter's four ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    Brightness,
    Contrast,
    Saturation,
    Hue,
}
