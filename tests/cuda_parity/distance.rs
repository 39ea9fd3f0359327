//! Case builders of tests/cuda_parity.rs for the distance-based OOD scores: squared L2 distances
//! and the Mahalanobis minimum (GEMM + epilogue kernels) against f64 sums, and the k-th smallest /
//! top-k selections against a sort, on rows full of ties; and the OOD GPU scorer
//! (src/ood/cuda_score.rs) against the CPU detector it was built from.

use super::{cu, randn, Case, Out, Run, F32_SUM_TOL};
use mood::model::init::Rng;

fn sqdist_ref(q: &[f32], t: &[f32], d: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for qr in q.chunks_exact(d) {
        for tr in t.chunks_exact(d) {
            let s: f64 = qr
                .iter()
                .zip(tr)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            out.push(s as f32);
        }
    }
    out
}

pub fn sqdist(m: usize, n: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (q, t) = (randn(rng, m * d, 1.0), randn(rng, n * d, 1.0));
        let want = sqdist_ref(&q, &t, d);
        let out = cu::distance::sqdist(dev, &dev.upload(&q)?, &dev.upload(&t)?, (m, n, d))?;
        let mut norms = dev.zeros::<f32>(m)?;
        cu::distance::row_sqnorm(dev, &dev.upload(&q)?, &mut norms, (m, d))?;
        let norms_want = q
            .chunks_exact(d)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        Ok(vec![
            Out("sqdist", dev.download(&out)?, want),
            Out("row_sqnorm", dev.download(&norms)?, norms_want),
        ])
    });
    Case(
        "sqdist",
        format!("q [{m}, {d}] t [{n}, {d}]"),
        "f32",
        F32_SUM_TOL,
        run,
    )
}

pub fn mahalanobis(m: usize, c: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (z, mu) = (randn(rng, m * d, 1.0), randn(rng, c * d, 0.3));
        let all = sqdist_ref(&z, &mu, d);
        let want = all
            .chunks_exact(c)
            .map(|r| -r.iter().fold(f32::INFINITY, |a, &b| a.min(b)))
            .collect();
        let s =
            cu::distance::mahalanobis_score(dev, &dev.upload(&z)?, &dev.upload(&mu)?, (m, c, d))?;
        Ok(vec![Out("score", dev.download(&s)?, want)])
    });
    Case(
        "mahalanobis_min",
        format!("z [{m}, {d}] C={c}"),
        "f32",
        F32_SUM_TOL,
        run,
    )
}

/// Values on a coarse grid, so that rows hold many ties (the selection must still be exact).
fn tied_rows(rng: &mut Rng, m: usize, n: usize) -> Vec<f32> {
    randn(rng, m * n, 4.0)
        .iter()
        .map(|v| (v * 2.0).round() / 2.0)
        .collect()
}

pub fn kth(m: usize, n: usize, k: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let d = tied_rows(rng, m, n);
        let want = d
            .chunks_exact(n)
            .map(|r| {
                let mut s = r.to_vec();
                s.sort_by(f32::total_cmp);
                s[k - 1]
            })
            .collect();
        let mut out = dev.zeros::<f32>(m)?;
        cu::distance::kth_smallest(dev, &dev.upload(&d)?, &mut out, (m, n), k)?;
        Ok(vec![Out("kth", dev.download(&out)?, want)])
    });
    Case("kth_smallest", format!("[{m}, {n}] k={k}"), "f32", 0.0, run)
}

pub fn topk(m: usize, n: usize, k: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let d = tied_rows(rng, m, n);
        let (mut vals, mut idx) = (Vec::new(), Vec::new());
        for r in d.chunks_exact(n) {
            let mut order: Vec<usize> = (0..n).collect();
            // Stable sort: equal values keep ascending index, the kernel's tie rule.
            order.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
            vals.extend(order[..k].iter().map(|&j| r[j]));
            idx.extend(order[..k].iter().map(|&j| j as f32));
        }
        let (mut vd, mut id) = (dev.zeros::<f32>(m * k)?, dev.zeros::<i32>(m * k)?);
        cu::distance::topk_smallest(dev, &dev.upload(&d)?, &mut vd, &mut id, (m, n), k)?;
        let got_idx = dev.download(&id)?.into_iter().map(|i| i as f32).collect();
        Ok(vec![
            Out("vals", dev.download(&vd)?, vals),
            Out("idx", got_idx, idx),
        ])
    });
    Case(
        "topk_smallest",
        format!("[{m}, {n}] k={k}"),
        "f32",
        0.0,
        run,
    )
}

/// Agreement of the GPU scorer with the CPU detector (see src/ood/cuda_score.rs): the f32
/// expansion against the CPU's f64-refined nearest means.
const SCORER_TOL: f32 = 1e-4;

/// `CudaScorer` against the CPU `Detector` it uploads: fitted on `n` rows around `c` class means
/// (N(0, 1) per feature, noise N(0, 1)), scoring `m` rows of which every other one is shifted
/// away (OOD-like), in batches of `batch` rows (0: as many as memory allows). The features carry a
/// common offset of 5, as real ViT features do, so the means' centring is exercised.
pub fn scorer(
    method: &'static str,
    (n, m, c, d): (usize, usize, usize, usize),
    settings: &'static [(&'static str, &'static str)],
    batch: usize,
) -> Case {
    use mood::ood::cuda_score::CudaScorer;
    use mood::ood::detector::{Detector, Inputs, Matrix};
    fn inputs<'a>(x: &'a [f32], d: usize, labels: Option<&'a [usize]>) -> Inputs<'a> {
        Inputs {
            features: Some(Matrix { data: x, cols: d }),
            labels,
            ..Default::default()
        }
    }
    let run: Run = Box::new(move |dev, rng| {
        let means = randn(rng, c * d, 1.0);
        let rows = |rng: &mut Rng, k: usize, shift: bool| -> Vec<f32> {
            (0..k * d)
                .map(|e| {
                    let far = shift && (e / d) % 2 == 1;
                    let mu = means[((e / d) % c) * d + e % d];
                    5.0 + if far { 3.0 } else { mu } + rng.normal() as f32
                })
                .collect()
        };
        let train = rows(rng, n, false);
        let labels: Vec<usize> = (0..n).map(|i| i % c).collect();
        let query = rows(rng, m, true);
        let args = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let det = Detector::fit(method, args, &inputs(&train, d, Some(&labels)))?;
        let want = det.score(&inputs(&query, d, None))?;
        let gpu = CudaScorer::new(dev, &det)?
            .ok_or_else(|| mood::Error::Cuda(format!("no GPU scorer for {method}")))?;
        let gpu = if batch > 0 {
            gpu.with_batch(batch)
        } else {
            gpu
        };
        Ok(vec![Out("scores", gpu.score(&query)?, want)])
    });
    let batch = if batch > 0 {
        format!(" batch {batch}")
    } else {
        String::new()
    };
    Case(
        "cuda_scorer",
        format!("{method} n={n} m={m} C={c} D={d}{batch}"),
        "f32",
        SCORER_TOL,
        run,
    )
}
