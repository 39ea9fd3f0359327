//! `mood bench --ood NAME`: OOD scoring throughput on synthetic Gaussian features, for any method
//! of features, labels, logits or a head (the head: the class means scaled by 1/√D).
//! A train set of --train-rows rows around --classes random class means (each mean and each
//! row's noise N(0, I) per feature) fits the detector; --rows rows drawn the same way are then
//! scored --iters times after one warm-up pass, and the median is reported as rows/s and as
//! milliseconds per 50,000 rows (the target: 50,000 x 1024 against 1000 classes, under
//! 50 ms on an H100).
//!
//! The multi-layer methods (`mahalanobis-ensemble`, `gram`) get per-block rows of three blocks
//! (`BLOCKS`, as `mood extract --layers 4,8,12`), each block --dim wide around its own class
//! means; the features and the head are the last block's.
//!
//! `--device cuda` times the GPU scorer (src/ood/cuda_score.rs) twice: host to host (the row
//! check, upload, GEMMs, epilogues, download: what `mood score` pays) and with the rows already on
//! the device; it also prints the largest difference from the CPU detector on the first 1024 rows.

use std::time::Instant;

use rayon::prelude::*;

use super::bench::Args;
use super::score_device::{Prepared, ScoreDevice};
use crate::error::{Error, Result};
use crate::model::init::Rng;
use crate::ood::detector::{method, parse_args, Detector, Head, Inputs, Matrix, Need};

/// The rows the CPU/GPU difference is measured on.
const CHECK_ROWS: usize = 1024;

/// The blocks of the synthetic per-block rows of the multi-layer methods.
const BLOCKS: [usize; 3] = [4, 8, 12];

/// The last of the blocks of rows [n, L·d] (the features of a store extracted with --layers).
fn last_block(x: &[f32], d: usize) -> Vec<f32> {
    let w = BLOCKS.len() * d;
    x.chunks_exact(w)
        .flat_map(|r| r[w - d..].iter().copied())
        .collect()
}

/// `n` rows of width `d` around `means` [C, d], row i in class i mod C: (rows, labels).
fn synthetic(n: usize, d: usize, means: &[f32], seed: u64) -> (Vec<f32>, Vec<usize>) {
    let c = means.len() / d;
    let labels: Vec<usize> = (0..n).map(|i| i % c).collect();
    let mut x = vec![0.0f32; n * d];
    const BLOCK: usize = 256;
    x.par_chunks_mut(BLOCK * d)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(b as u64));
            for (i, row) in chunk.chunks_mut(d).enumerate() {
                let mu = &means[(b * BLOCK + i) % c * d..][..d];
                for (v, m) in row.iter_mut().zip(mu) {
                    *v = m + rng.normal() as f32;
                }
            }
        });
    (x, labels)
}

/// Median of `iters` timed calls after one warm-up call, seconds.
fn median_time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let pb = crate::progress::Progress::new(iters as u64, "iter", "bench");
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    pb.finish_and_clear();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// (max abs, max rel) difference, rel = |a − b| / (|b| + rms(b)) as tests/cuda_parity.rs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn difference(got: &[f32], want: &[f32]) -> (f64, f64) {
    let rms =
        (want.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    got.iter().zip(want).fold((0.0, 0.0), |(a, r), (&g, &w)| {
        let e = (g as f64 - w as f64).abs();
        (a.max(e), r.max(e / (w.abs() as f64 + rms)))
    })
}

/// What the GPU timing adds to the report.
struct GpuFigures {
    resident_s: Option<f64>,
    batch: usize,
    diff: (f64, f64),
}

pub fn run(args: &Args, name: &str) -> Result<()> {
    let m = method(name)?;
    // Synthetic rows, labels and a random head stand in for a store: methods that need patch
    // tokens or ODIN scores have nothing to run on.
    if let Some(n) = m
        .needs
        .iter()
        .find(|n| matches!(n, Need::Local | Need::Odin))
    {
        return Err(Error::Usage(format!(
            "--ood {name}: the benchmark has no {} to time it on; choose a method of features, labels, logits or a head",
            n.what()
        )));
    }
    let (rows, d, classes) = (args.rows, args.dim, args.classes);
    let train_rows = args.train_rows.unwrap_or(10_000);
    if rows == 0 || d == 0 || classes == 0 || train_rows == 0 {
        return Err(Error::Usage(
            "--ood needs --rows, --dim, --classes and --train-rows of at least 1".into(),
        ));
    }
    let labelled = m.needs.contains(&Need::Labels);
    if labelled && train_rows < classes {
        return Err(Error::Usage(format!(
            "--train-rows {train_rows} leaves classes without rows: use at least --classes ({classes})"
        )));
    }
    let settings = parse_args(m, &args.method_args)?;
    let k = settings.get("k").cloned();

    let layered = m.needs.contains(&Need::Layers);
    // Width of a synthetic row: one block, or every block of BLOCKS side by side.
    let width = if layered { BLOCKS.len() * d } else { d };
    let mut rng = Rng::new(7);
    let means: Vec<f32> = (0..classes * width).map(|_| rng.normal() as f32).collect();
    let (train, labels) = synthetic(train_rows, width, &means, 1);
    let (query, _) = synthetic(rows, width, &means, 2);
    // A head that reads the classes: the class means, scaled so logits stay near unit size.
    let scale = 1.0 / (d as f32).sqrt();
    let head = Head {
        weight: means
            .chunks_exact(width)
            .flat_map(|mu| mu[width - d..].iter().map(|v| v * scale))
            .collect(),
        bias: vec![0.0; classes],
        fc_norm: None,
    };
    let (train_f, query_f) = match layered {
        true => (last_block(&train, d), last_block(&query, d)),
        false => (Vec::new(), Vec::new()),
    };
    // The features: the rows themselves, or their last block.
    fn pick<'a>(layered: bool, rows: &'a [f32], last: &'a [f32]) -> &'a [f32] {
        if layered {
            last
        } else {
            rows
        }
    }
    fn layer_inputs(layered: bool, x: &[f32], width: usize) -> Option<Matrix<'_>> {
        layered.then_some(Matrix {
            data: x,
            cols: width,
        })
    }
    let t = Instant::now();
    let det = Detector::fit(
        name,
        settings,
        &Inputs {
            features: Some(Matrix {
                data: pick(layered, &train, &train_f),
                cols: d,
            }),
            labels: Some(&labels),
            head: Some(&head),
            layers: layer_inputs(layered, &train, width),
            layer_blocks: &BLOCKS,
            ..Default::default()
        },
    )?;
    let fit_s = t.elapsed().as_secs_f64();
    drop(train);
    drop(train_f);
    let inputs = Inputs {
        features: Some(Matrix {
            data: pick(layered, &query, &query_f),
            cols: d,
        }),
        head: Some(&head),
        layers: layer_inputs(layered, &query, width),
        layer_blocks: &BLOCKS,
        ..Default::default()
    };

    let device = ScoreDevice::open(args.device)?;
    let prepared = device.prepare(&det)?;
    let median_s = median_time(args.iters, || prepared.score(&inputs).map(drop))?;
    let gpu = gpu_figures(
        &prepared,
        &det,
        pick(layered, &query, &query_f),
        d,
        args.iters,
    )?;

    let per_50k = |s: f64| 1e3 * s * 50_000.0 / rows as f64;
    let rate = |s: f64| rows as f64 / s;
    let where_ = if gpu.is_some() { "cuda" } else { "cpu" };
    // On the CPU stand-in for CUDA only the agreement with the CPU scores means anything.
    let stand_in = gpu.is_some() && crate::cuda_stand_in::loaded();
    let threads = rayon::current_num_threads();
    if args.json {
        let v = serde_json::json!({
            "ood": name,
            "device": where_,
            "rows": rows,
            "dim": d,
            "classes": classes,
            "train_rows": train_rows,
            "k": k,
            "threads": threads,
            "fit_s": fit_s,
            "stand_in": stand_in,
            "median_s": (!stand_in).then_some(median_s),
            "ms_per_50k": (!stand_in).then(|| per_50k(median_s)),
            "rows_per_s": (!stand_in).then(|| rate(median_s)),
            "resident_median_s": gpu.as_ref().and_then(|g| g.resident_s).filter(|_| !stand_in),
            "resident_ms_per_50k": gpu.as_ref().and_then(|g| g.resident_s).filter(|_| !stand_in).map(per_50k),
            "max_abs_diff_vs_cpu": gpu.as_ref().map(|g| g.diff.0),
            "max_rel_diff_vs_cpu": gpu.as_ref().map(|g| g.diff.1),
        });
        println!("{v}");
        return Ok(());
    }
    let against = match &k {
        Some(k) => format!("{train_rows} train rows, k = {k}"),
        None => format!("{classes} classes, fitted on {train_rows} rows"),
    };
    println!(
        "ood {name} on {where_} ({threads} threads): {rows} rows x {d} against {against} (fit {fit_s:.2} s)"
    );
    if stand_in {
        println!("  {}", crate::cuda_stand_in::NO_GPU_FIGURES);
    }
    let label = if gpu.is_some() {
        "host to host"
    } else {
        "scoring"
    };
    if !stand_in {
        println!(
            "  {label}: {:.1} ms per 50k rows, {:.0} rows/s (median of {})",
            per_50k(median_s),
            rate(median_s),
            args.iters
        );
    }
    if let Some(g) = gpu {
        match g.resident_s.filter(|_| !stand_in) {
            Some(s) => println!(
                "  device-resident: {:.2} ms per 50k rows, {:.0} rows/s (rows already on the GPU)",
                per_50k(s),
                rate(s)
            ),
            None if stand_in => {}
            None => println!(
                "  device-resident: not timed ({rows} rows are more than one batch of {})",
                g.batch
            ),
        }
        println!(
            "  vs the CPU detector on the first {} rows: max |diff| {:.3e}, max rel {:.3e}",
            rows.min(CHECK_ROWS),
            g.diff.0,
            g.diff.1
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_figures(
    prepared: &Prepared,
    det: &Detector,
    query: &[f32],
    d: usize,
    iters: usize,
) -> Result<Option<GpuFigures>> {
    let Prepared::Gpu(_, gpu) = prepared else {
        return Ok(None);
    };
    let rows = query.len() / d;
    let resident_s = if rows <= gpu.batch() {
        let x = gpu.upload(query)?;
        Some(median_time(iters, || {
            gpu.score_resident(&x, rows).map(drop)
        })?)
    } else {
        None
    };
    let head = &query[..rows.min(CHECK_ROWS) * d];
    let inputs = Inputs {
        features: Some(Matrix {
            data: head,
            cols: d,
        }),
        ..Default::default()
    };
    let diff = difference(&gpu.score(head)?, &det.score(&inputs)?);
    Ok(Some(GpuFigures {
        resident_s,
        batch: gpu.batch(),
        diff,
    }))
}

#[cfg(not(feature = "cuda"))]
fn gpu_figures(
    _prepared: &Prepared,
    _det: &Detector,
    _query: &[f32],
    _d: usize,
    _iters: usize,
) -> Result<Option<GpuFigures>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_rows_sit_around_their_class_means() {
        let (d, c) = (8, 3);
        let means: Vec<f32> = (0..c * d).map(|k| 10.0 * (k / d) as f32).collect();
        let (x, y) = synthetic(3000, d, &means, 5);
        assert_eq!(y[4], 1);
        for class in 0..c {
            let rows: Vec<&[f32]> = x.chunks(d).skip(class).step_by(c).collect();
            let mean = rows.iter().map(|r| r[0]).sum::<f32>() / rows.len() as f32;
            assert!((mean - 10.0 * class as f32).abs() < 0.15, "{class}: {mean}");
        }
        assert_eq!(synthetic(3000, d, &means, 5).0, x, "deterministic");
    }

    #[test]
    fn difference_is_the_parity_measure() {
        assert_eq!(difference(&[1.0, 2.0], &[1.0, 2.0]), (0.0, 0.0));
        let (a, r) = difference(&[-3.0], &[-4.0]);
        assert_eq!(a, 1.0);
        assert!((r - 1.0 / 8.0).abs() < 1e-12, "{r}");
    }
}
