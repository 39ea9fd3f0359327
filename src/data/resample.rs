//! Pillow's `Image.resize` (BILINEAR / BICUBIC, 8 bits per channel), reproduced to the bit, since
//! that is what torchvision's `Resize` runs on PIL images and what every reference pipeline uses.
//!
//! The arithmetic, as in Pillow's Resample.c:
//! - scale = in / out; the filter is widened by max(scale, 1) (antialiasing when shrinking), so
//!   its support is `support · max(scale, 1)` source pixels.
//! - Output pixel x is centred at (x + 0.5)·scale; it reads source pixels
//!   [⌊centre − support + 0.5⌋, ⌊centre + support + 0.5⌋) ∩ [0, in), with weights
//!   filter((i − centre + 0.5) / max(scale, 1)) normalised to sum 1 in f64, then rounded away from
//!   zero to 22-bit fixed point.
//! - Horizontal pass first, rounded and clamped to 8 bits, then the vertical pass on those bytes.
//!   The clamp between the passes matters: bicubic overshoots, so the order is part of the result.
//!   (Pillow 13.0 sometimes runs the vertical pass first when both axes shrink by different
//!   factors, e.g. a square resize of a non-square image, by a rule its published source does not
//!   show yet; there the two differ by a level at most. Aspect-keeping resizes agree exactly.)
//!
//! A centre crop is folded in: coefficients depend only on the output index, so computing a window
//! of output rows and columns gives exactly the pixels of the full resize followed by the crop.
//! Sums are exact integers, so the loops are free to run in whatever order vectorises.

/// Pillow's resampling filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle, support 1.
    Bilinear,
    /// Keys cubic with a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Fixed-point weights of one axis: output i reads `count[i]` source pixels from `first[i]` with
/// weights `k[i·ksize ..]`.
struct Axis {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    k: Vec<i32>,
}

impl Axis {
    /// Weights for output indices `range` of an `in_size` → `out_size` resize.
    fn new(in_size: usize, out_size: usize, range: std::ops::Range<usize>, f: Filter) -> Axis {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = f.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let n = range.len();
        let mut axis = Axis {
            ksize,
            first: Vec::with_capacity(n),
            count: Vec::with_capacity(n),
            k: vec![0; n * ksize],
        };
        let mut w = vec![0f64; ksize];
        for (slot, xx) in range.enumerate() {
            let centre = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; negative values are clamped to 0 just after.
            let xmin = ((centre - support + 0.5) as i64).max(0) as usize;
            let xmax = ((centre + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let mut total = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(count) {
                *wx = f.weight((x as f64 + xmin as f64 - centre + 0.5) / filterscale);
                total += *wx;
            }
            let dst = &mut axis.k[slot * ksize..slot * ksize + count];
            for (d, &wx) in dst.iter_mut().zip(&w) {
                let v = if total != 0.0 { wx / total } else { wx };
                let scaled = v * (1u32 << PRECISION_BITS) as f64;
                *d = if v < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            axis.first.push(xmin);
            axis.count.push(count);
        }
        axis
    }

    fn weights(&self, slot: usize) -> (usize, &[i32]) {
        let k = &self.k[slot * self.ksize..slot * self.ksize + self.count[slot]];
        (self.first[slot], k)
    }
}

/// Pillow's clip8: 255 at or above 256 << 22, 0 at or below 0, else v >> 22; an arithmetic shift
/// then a clamp gives the same value on every i32.
#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Where a resize output window sits: the full output size and the window kept from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub full: (usize, usize),
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

/// Scratch buffers reused across images (one per worker thread).
#[derive(Default)]
pub struct Scratch {
    rows: Vec<u8>,
    acc: Vec<i32>,
    line: Vec<u8>,
}

/// Resizes the packed RGB image `src` (`w`×`h`) to `win.full` with Pillow's arithmetic and writes
/// the window `win` (packed RGB, `win.width`×`win.height`) to `out`.
pub fn resize_rgb(
    src: &[u8],
    (w, h): (usize, usize),
    win: Window,
    f: Filter,
    scratch: &mut Scratch,
    out: &mut [u8],
) {
    assert_eq!(src.len(), w * h * 3, "resize_rgb: source size");
    assert_eq!(
        out.len(),
        win.width * win.height * 3,
        "resize_rgb: output size"
    );
    assert!(win.left + win.width <= win.full.0 && win.top + win.height <= win.full.1);
    let need_h = win.full.0 != w;
    let need_v = win.full.1 != h;

    // The source rows the vertical pass reads (all of them when there is no vertical pass).
    let vert = need_v.then(|| Axis::new(h, win.full.1, win.top..win.top + win.height, f));
    let (y0, y1) = match &vert {
        Some(a) => {
            let last = a.count.len() - 1;
            (a.first[0], a.first[last] + a.count[last])
        }
        None => (win.top, win.top + win.height),
    };

    // Horizontal pass over rows y0..y1, only the kept columns; or the kept columns copied.
    let row_len = win.width * 3;
    let rows = &mut scratch.rows;
    rows.clear();
    rows.resize((y1 - y0) * row_len, 0);
    if need_h {
        let horiz = Axis::new(w, win.full.0, win.left..win.left + win.width, f);
        horizontal_pass(src, w, y0..y1, &horiz, &mut scratch.line, rows);
    } else {
        for (y, dst) in (y0..y1).zip(rows.chunks_exact_mut(row_len)) {
            let s = (y * w + win.left) * 3;
            dst.copy_from_slice(&src[s..s + row_len]);
        }
    }

    // Vertical pass: each output row is a weighted sum of whole intermediate rows.
    let Some(vert) = vert else {
        out.copy_from_slice(rows);
        return;
    };
    for (slot, dst) in out.chunks_exact_mut(row_len).enumerate() {
        let (first, k) = vert.weights(slot);
        let taps = &rows[(first - y0) * row_len..(first - y0 + k.len()) * row_len];
        vertical_row(taps, k, &mut scratch.acc, dst);
    }
}

/// The horizontal pass over source rows `ys` of the packed RGB `src` (`w` wide) into `rows`.
fn horizontal_pass(
    src: &[u8],
    w: usize,
    ys: std::ops::Range<usize>,
    axis: &Axis,
    line: &mut Vec<u8>,
    rows: &mut [u8],
) {
    let row_len = axis.count.len() * 3;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        let pairs = avx2::Pairs::new(axis);
        // RGBX, one zero pixel past the end: the kernel reads taps in pairs as 8-byte loads.
        line.clear();
        line.resize((w + 1) * 4, 0);
        for (y, dst) in ys.zip(rows.chunks_exact_mut(row_len)) {
            for (px, rgb) in line
                .chunks_exact_mut(4)
                .zip(src[y * w * 3..(y + 1) * w * 3].chunks_exact(3))
            {
                px[..3].copy_from_slice(rgb);
            }
            // SAFETY: AVX2 was detected just above; the line holds w + 1 pixels (Pairs::new
            // documents the bound).
            unsafe { avx2::horizontal_row(line, &pairs, dst) };
        }
        return;
    }
    let _ = line;
    for (y, dst) in ys.zip(rows.chunks_exact_mut(row_len)) {
        horizontal_row_portable(&src[y * w * 3..(y + 1) * w * 3], axis, dst);
    }
}

/// The plain reference of the horizontal pass, one packed-RGB row.
fn horizontal_row_portable(line: &[u8], axis: &Axis, dst: &mut [u8]) {
    for (x, px) in dst.chunks_exact_mut(3).enumerate() {
        let (first, k) = axis.weights(x);
        let taps = &line[first * 3..(first + k.len()) * 3];
        let (mut r, mut g, mut b) = (HALF, HALF, HALF);
        for (&kw, p) in k.iter().zip(taps.chunks_exact(3)) {
            r += p[0] as i32 * kw;
            g += p[1] as i32 * kw;
            b += p[2] as i32 * kw;
        }
        px[0] = clip8(r);
        px[1] = clip8(g);
        px[2] = clip8(b);
    }
}

/// One output row of the vertical pass: `taps` holds `k.len()` consecutive intermediate rows.
fn vertical_row(taps: &[u8], k: &[i32], acc: &mut Vec<i32>, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { vertical_row_avx2(taps, k, acc, dst) };
    }
    vertical_row_portable(taps, k, acc, dst)
}

/// The same loop compiled with AVX2 enabled, so it vectorises eight lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_row_avx2(taps: &[u8], k: &[i32], acc: &mut Vec<i32>, dst: &mut [u8]) {
    vertical_row_portable(taps, k, acc, dst)
}

#[inline(always)]
fn vertical_row_portable(taps: &[u8], k: &[i32], acc: &mut Vec<i32>, dst: &mut [u8]) {
    let n = dst.len();
    acc.clear();
    acc.resize(n, HALF);
    for (row, &kw) in taps.chunks_exact(n).zip(k) {
        for (a, &p) in acc.iter_mut().zip(row) {
            *a += p as i32 * kw;
        }
    }
    for (d, &a) in dst.iter_mut().zip(acc.iter()) {
        *d = clip8(a);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[allow(unused_imports)]
    use super::PRECISION_BITS;
    use super::{Axis, HALF};
    use std::arch::x86_64::*;

    /// Each output's weights in pairs of taps, each pair spread over 8 lanes ([k0;4], [k1;4]) to
    /// multiply two RGBX pixels at once; an odd count gets a zero-weight partner tap.
    pub struct Pairs {
        first: Vec<usize>,
        start: Vec<usize>,
        k: Vec<[i32; 8]>,
    }

    impl Pairs {
        /// A row passed with these pairs must hold at least (source width + 1) RGBX pixels:
        /// a pair starting at the last tap reads one pixel past it.
        pub fn new(axis: &Axis) -> Pairs {
            let n = axis.count.len();
            let mut p = Pairs {
                first: Vec::with_capacity(n),
                start: Vec::with_capacity(n + 1),
                k: Vec::new(),
            };
            for x in 0..n {
                let (first, k) = axis.weights(x);
                p.first.push(first);
                p.start.push(p.k.len());
                for pair in k.chunks(2) {
                    let (a, b) = (pair[0], pair.get(1).copied().unwrap_or(0));
                    p.k.push([a, a, a, a, b, b, b, b]);
                }
            }
            p.start.push(p.k.len());
            p
        }
    }

    /// Σ weight · pixel over output `x`'s taps, as i32 lanes [r, g, b, x].
    #[target_feature(enable = "avx2")]
    unsafe fn taps(line: &[u8], p: &Pairs, x: usize) -> __m128i {
        let (s, e) = (p.start[x], p.start[x + 1]);
        let base = p.first[x] * 4;
        assert!(base + (e - s) * 8 <= line.len());
        let mut acc = _mm256_setzero_si256();
        for (j, k) in p.k[s..e].iter().enumerate() {
            // SAFETY: the assert above keeps every 8-byte load inside `line`.
            let px = _mm_loadl_epi64(line.as_ptr().add(base + j * 8) as *const __m128i);
            let kv = _mm256_loadu_si256(k.as_ptr() as *const __m256i);
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(px), kv));
        }
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256::<1>(acc),
        );
        _mm_add_epi32(sum, _mm_set1_epi32(HALF))
    }

    /// One row of the horizontal pass: `line` is RGBX, `out` packed RGB. Two outputs at a time,
    /// rounded together: an arithmetic shift, then the i32→i16 and i16→u8 saturating packs,
    /// which clamp to 0..=255 exactly as clip8 does.
    #[target_feature(enable = "avx2")]
    pub unsafe fn horizontal_row(line: &[u8], p: &Pairs, out: &mut [u8]) {
        let n = p.first.len();
        assert!(out.len() == n * 3);
        let mut x = 0;
        while x < n {
            let a = _mm_srai_epi32::<{ super::PRECISION_BITS as i32 }>(taps(line, p, x));
            let b = if x + 1 < n {
                _mm_srai_epi32::<{ super::PRECISION_BITS as i32 }>(taps(line, p, x + 1))
            } else {
                _mm_setzero_si128()
            };
            let bytes = _mm_packus_epi16(_mm_packs_epi32(a, b), _mm_setzero_si128());
            let mut v = [0u8; 16];
            _mm_storeu_si128(v.as_mut_ptr() as *mut __m128i, bytes);
            out[x * 3..x * 3 + 3].copy_from_slice(&v[..3]);
            if x + 1 < n {
                out[x * 3 + 3..x * 3 + 6].copy_from_slice(&v[4..7]);
            }
            x += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for f in [Filter::Bilinear, Filter::Bicubic] {
            for (i, o) in [(375, 256), (100, 224), (500, 7), (33, 32)] {
                let a = Axis::new(i, o, 0..o, f);
                for s in 0..o {
                    let sum: i64 = a.weights(s).1.iter().map(|&k| k as i64).sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= a.ksize as i64,
                        "{f:?} {i}->{o}"
                    );
                }
            }
        }
    }

    /// The AVX2 kernels against the plain loops, on rows with full-range, overshooting content.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_the_portable_loops() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("SKIPPED: no AVX2 on this CPU");
            return;
        }
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            if (seed >> 9) % 3 == 0 {
                255
            } else {
                (seed >> 24) as u8
            }
        };
        for f in [Filter::Bilinear, Filter::Bicubic] {
            for (w, out) in [(500, 341), (375, 224), (97, 13), (13, 40), (8, 3)] {
                let line: Vec<u8> = (0..w * 3).map(|_| next()).collect();
                let axis = Axis::new(w, out, 0..out, f);
                let mut want = vec![0u8; out * 3];
                horizontal_row_portable(&line, &axis, &mut want);
                let mut rgbx = vec![0u8; (w + 1) * 4];
                for (p, c) in rgbx.chunks_exact_mut(4).zip(line.chunks_exact(3)) {
                    p[..3].copy_from_slice(c);
                }
                let mut got = vec![0u8; out * 3];
                unsafe { avx2::horizontal_row(&rgbx, &avx2::Pairs::new(&axis), &mut got) };
                assert_eq!(got, want, "horizontal {f:?} {w}->{out}");

                let k = &axis.k[..axis.count[0]];
                let taps: Vec<u8> = (0..k.len() * 30).map(|_| next()).collect();
                let (mut acc, mut a, mut b) = (Vec::new(), vec![0u8; 30], vec![0u8; 30]);
                vertical_row_portable(&taps, k, &mut acc, &mut a);
                unsafe { vertical_row_avx2(&taps, k, &mut acc, &mut b) };
                assert_eq!(a, b, "vertical {f:?} {w}->{out}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_window_matches_full() {
        let (w, h) = (37, 23);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let full = (20, 29);
        let mut s = Scratch::default();
        let mut whole = vec![0u8; full.0 * full.1 * 3];
        let all = Window {
            full,
            left: 0,
            top: 0,
            width: full.0,
            height: full.1,
        };
        resize_rgb(&src, (w, h), all, Filter::Bicubic, &mut s, &mut whole);
        let win = Window {
            full,
            left: 3,
            top: 5,
            width: 11,
            height: 13,
        };
        let mut part = vec![0u8; 11 * 13 * 3];
        resize_rgb(&src, (w, h), win, Filter::Bicubic, &mut s, &mut part);
        for y in 0..13 {
            let a = &whole[((5 + y) * full.0 + 3) * 3..((5 + y) * full.0 + 14) * 3];
            assert_eq!(a, &part[y * 33..(y + 1) * 33]);
        }
        let flat = vec![200u8; w * h * 3];
        resize_rgb(&flat, (w, h), all, Filter::Bicubic, &mut s, &mut whole);
        assert!(whole.iter().all(|&v| v == 200));
    }
}
