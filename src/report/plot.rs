//! Per-method figures for `mood eval`: score histograms (ID against each OOD set, as densities)
//! and ROC curves, drawn with plotters into an RGB buffer and encoded as PNG by `image`. Text uses
//! the embedded DejaVu Sans, so no system font library is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded file is a valid TrueType font; failure would only lose the labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// (false positive rate, true positive rate) with ID positive and higher score = ID, one point per
/// distinct threshold (thinned to at most ~1000 points).
pub fn roc_points(id: &[f32], ood: &[f32]) -> Vec<(f64, f64)> {
    let (p, n) = (id.len() as f64, ood.len() as f64);
    let pts: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
        .chain(
            crate::metrics::curve(id, ood)
                .into_iter()
                .map(|(tp, fp)| (fp / n, tp / p)),
        )
        .collect();
    let step = (pts.len() / 1000).max(1);
    let last = *pts.last().expect("at least the origin");
    let mut out: Vec<(f64, f64)> = pts.into_iter().step_by(step).collect();
    if out.last() != Some(&last) {
        out.push(last);
    }
    out
}

fn densities(v: &[f32], lo: f64, width: f64, bins: usize) -> Vec<f64> {
    let mut h = vec![0.0f64; bins];
    for &s in v {
        let b = (((s as f64 - lo) / width) as usize).min(bins - 1);
        h[b] += 1.0;
    }
    let norm = v.len().max(1) as f64 * width;
    h.iter().map(|c| c / norm).collect()
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One PNG with the histogram (left) and the ROC curves (right) of a method.
pub fn method_figure(path: &Path, method: &str, id: &[f32], oods: &[(&str, &[f32])]) -> Result<()> {
    register_font();
    let (w, h) = (1200u32, 480u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let draw = |buf: &mut [u8]| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(w / 2);
        let all = id.iter().chain(oods.iter().flat_map(|(_, s)| s.iter()));
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &s| {
            (a.min(s as f64), b.max(s as f64))
        });
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let bins = 50;
        let width = (hi - lo) / bins as f64;
        let sets: Vec<(&str, &[f32])> = std::iter::once(("ID", id))
            .chain(oods.iter().copied())
            .collect();
        let hists: Vec<Vec<f64>> = sets
            .iter()
            .map(|(_, s)| densities(s, lo, width, bins))
            .collect();
        let ymax = hists.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.05 + 1e-12;
        let mut chart = ChartBuilder::on(&left)
            .caption(
                format!("{method}: scores (higher = ID)"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc("score")
            .y_desc("density")
            .draw()?;
        for (k, ((name, _), hist)) in sets.iter().zip(&hists).enumerate() {
            let c = COLOURS[k % COLOURS.len()];
            let pts: Vec<(f64, f64)> = hist
                .iter()
                .enumerate()
                .flat_map(|(b, &v)| [(lo + b as f64 * width, v), (lo + (b + 1) as f64 * width, v)])
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        let mut roc = ChartBuilder::on(&right)
            .caption(format!("{method}: ROC (ID positive)"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        roc.configure_mesh()
            .x_desc("false positive rate (OOD accepted)")
            .y_desc("true positive rate")
            .draw()?;
        for (k, (name, s)) in oods.iter().enumerate() {
            let c = COLOURS[(k + 1) % COLOURS.len()];
            roc.draw_series(LineSeries::new(roc_points(id, s), c.stroke_width(2)))?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        roc.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw(&mut buf).map_err(|e| Error::Data(format!("drawing {}: {e}", path.display())))?;
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer sized for the image");
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("encoding {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &png)
}
