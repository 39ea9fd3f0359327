//! Per-method figures for `mood eval`: score histograms (ID against each OOD set, as densities)
//! and ROC curves, drawn with plotters into an RGB buffer and encoded as PNG by `image`, and the
//! same drawing as SVG. Text uses the embedded DejaVu Sans, so no system font library is needed
//! (the SVG names the font family; a viewer without it substitutes another sans-serif).

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

/// The score axis of a histogram figure: [lo, hi] and how many scores fall outside it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    /// Scores outside [lo, hi] (and non-finite ones), not drawn.
    pub outside: usize,
    /// Whether the axis is narrower than the scores' full range.
    pub clipped: bool,
}

/// Share of each set allowed beyond each end of the axis: one extreme score (1e5 among scores of
/// order 1) would otherwise squeeze every other set into a single bin.
pub const CLIP_QUANTILE: f64 = 0.01;

/// The axis covering, for every set, its scores between the `CLIP_QUANTILE` and 1 −
/// `CLIP_QUANTILE` quantiles (nearest rank, inward), so that no set's bulk is cut.
pub fn histogram_axis(sets: &[&[f32]]) -> Axis {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for set in sets {
        let mut v: Vec<f64> = set
            .iter()
            .map(|&x| x as f64)
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        let last = (v.len() - 1) as f64;
        lo = lo.min(v[(CLIP_QUANTILE * last).ceil() as usize]);
        hi = hi.max(v[((1.0 - CLIP_QUANTILE) * last).floor() as usize]);
        min = min.min(v[0]);
        max = max.max(v[v.len() - 1]);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi <= lo {
        (lo, hi) = (lo - 0.5, lo + 0.5);
    }
    // A little room so the extreme kept scores do not sit on the frame.
    let pad = 0.02 * (hi - lo);
    let (lo, hi) = (lo - pad, hi + pad);
    let outside = sets
        .iter()
        .flat_map(|s| s.iter())
        .filter(|&&x| !(x as f64 >= lo && x as f64 <= hi))
        .count();
    Axis {
        lo,
        hi,
        outside,
        clipped: min < lo || max > hi,
    }
}

/// Counts of `v` in `bins` equal bins over the axis; scores outside it are not counted.
pub fn bin_counts(v: &[f32], axis: &Axis, bins: usize) -> Vec<usize> {
    let width = (axis.hi - axis.lo) / bins as f64;
    let mut h = vec![0usize; bins];
    for &s in v {
        let s = s as f64;
        if s >= axis.lo && s <= axis.hi {
            h[(((s - axis.lo) / width) as usize).min(bins - 1)] += 1;
        }
    }
    h
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// A legend as a row of entries under a chart, where it covers no data.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, RGBColor)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let mut x = 60i32;
    for (label, c) in entries {
        area.draw(&PathElement::new(
            vec![(x, 12), (x + 20, 12)],
            c.stroke_width(3),
        ))?;
        area.draw(&Text::new(
            label.clone(),
            (x + 26, 4),
            ("sans-serif", 14).into_font(),
        ))?;
        x += 40 + 8 * label.chars().count() as i32;
    }
    Ok(())
}

/// The figure of one method on any backend: histogram (left), ROC curves (right).
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    method: &str,
    id: &[f32],
    oods: &[(&str, &[f32])],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (w, h) = root.dim_in_pixel();
    let (left, right) = root.split_horizontally(w / 2);
    let legend_h = 30;
    let (hist_area, hist_legend) = left.split_vertically(h - legend_h);
    let (roc_area, roc_legend) = right.split_vertically(h - legend_h);
    let sets: Vec<(&str, &[f32])> = std::iter::once(("ID", id))
        .chain(oods.iter().copied())
        .collect();
    let slices: Vec<&[f32]> = sets.iter().map(|(_, s)| *s).collect();
    let axis = histogram_axis(&slices);
    let bins = 50;
    let width = (axis.hi - axis.lo) / bins as f64;
    let hists: Vec<Vec<f64>> = sets
        .iter()
        .map(|(_, s)| {
            let norm = s.len().max(1) as f64 * width;
            bin_counts(s, &axis, bins)
                .into_iter()
                .map(|c| c as f64 / norm)
                .collect()
        })
        .collect();
    let ymax = hists.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.05 + 1e-12;
    let x_desc = if axis.clipped {
        format!(
            "score (axis clipped to each set's 1-99% quantiles; {} outside not drawn)",
            axis.outside
        )
    } else {
        "score".to_string()
    };
    let mut chart = ChartBuilder::on(&hist_area)
        .caption(
            format!("{method}: scores (higher = ID)"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(50)
        .build_cartesian_2d(axis.lo..axis.hi, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("density")
        .draw()?;
    let mut entries = Vec::new();
    for (k, ((name, _), hist)) in sets.iter().zip(&hists).enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let pts: Vec<(f64, f64)> = hist
            .iter()
            .enumerate()
            .flat_map(|(b, &v)| {
                [
                    (axis.lo + b as f64 * width, v),
                    (axis.lo + (b + 1) as f64 * width, v),
                ]
            })
            .collect();
        chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))?;
        entries.push((name.to_string(), c));
    }
    legend(&hist_legend, &entries)?;
    let mut roc = ChartBuilder::on(&roc_area)
        .caption(format!("{method}: ROC (ID positive)"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    roc.configure_mesh()
        .x_desc("false positive rate (OOD accepted)")
        .y_desc("true positive rate")
        .draw()?;
    // The chance line: a score that knows nothing.
    roc.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (1.0, 1.0)],
        RGBColor(150, 150, 150).stroke_width(1),
    ))?;
    let mut entries = Vec::new();
    for (k, (name, s)) in oods.iter().enumerate() {
        let c = COLOURS[(k + 1) % COLOURS.len()];
        roc.draw_series(LineSeries::new(roc_points(id, s), c.stroke_width(2)))?;
        let auroc = crate::metrics::auroc(id, s);
        entries.push((format!("{name} (AUROC {:.2}%)", 100.0 * auroc), c));
    }
    entries.push(("chance".into(), RGBColor(150, 150, 150)));
    legend(&roc_legend, &entries)?;
    root.present()?;
    Ok(())
}

/// The figure of a method (histogram left, ROC curves right) as a PNG at `path` and an SVG
/// beside it (same name, .svg), for papers.
pub fn method_figure(path: &Path, method: &str, id: &[f32], oods: &[(&str, &[f32])]) -> Result<()> {
    register_font();
    let (w, h) = (1200u32, 500u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(),
        method,
        id,
        oods,
    )
    .map_err(|e| Error::Data(format!("drawing {}: {e}", path.display())))?;
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer sized for the image");
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("encoding {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &png)?;
    let svg_path = path.with_extension("svg");
    let mut svg = String::new();
    draw(
        SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area(),
        method,
        id,
        oods,
    )
    .map_err(|e| Error::Data(format!("drawing {}: {e}", svg_path.display())))?;
    crate::fsutil::write_atomic(&svg_path, svg.as_bytes())
}
