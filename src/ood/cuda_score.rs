//! The GPU scorer of the distance-based detectors: a fitted `mahalanobis`, `mood-v1`, `gauss`,
//! `mahalanobis-cc` or `knn` detector scored on CUDA device memory with cuBLAS (f32) and the
//! epilogues of kernels/distance.cu (src/backend/cuda/distance.rs).
//!
//! The fitted statistics are uploaded once: per Gaussian, the whitening W [R, D], the whitened
//! means Wμ_c [C, R] and their squared norms [C]; for kNN the L2-normalised train bank [N, D].
//! Query rows then stream through in batches whose buffers are sized against the free device
//! memory (src/backend/memory_budget.rs): per batch of B rows,
//!   - Gaussian: z = x·Wᵀ − m̄ [B, R] (sgemm, then the bias kernel), cross = z·mᵀ [B, C] (sgemm),
//!     ‖z‖² (`row_sqnorm`), then `mahalanobis_min` = −max(0, min_c ‖z‖² − 2 z·m_c + ‖m_c‖²), the
//!     means m_c = Wμ_c − m̄ taken about their centroid m̄ (`centred`); several Gaussians (one per
//!     class, `mahalanobis-cc`) keep the best of their per-Gaussian scores;
//!   - kNN: dots = q·tᵀ [B, N] (sgemm), `sqdist_combine` with ‖t‖² = 1 (the CPU's identity
//!     ‖q − t‖² = ‖q‖² + 1 − 2 q·t), then `kth_smallest` → −d_(k).
//!
//! The methods on L2-normalised features (`mood-v1`, `gauss`, `mahalanobis-cc`, `knn`) normalise
//! each batch on the host with the CPU's own function before the upload, so both paths see the
//! same normalised rows. Non-finite rows are refused on the host first, with the CPU's message.
//!
//! Precision: the GPU returns the f32 GEMM-expansion score. The CPU path recomputes each row's
//! nearest means directly as ‖z − m_c‖² in f64, which the GPU does not, so the two differ by the
//! cancellation of the expansion: |gpu − cpu| ≲ 1e-5·(‖Wx − m̄‖² + ‖Wμ_c − m̄‖²) for the nearest
//! mean, about 1e-5 relative when the distance is comparable with those norms (most rows, since
//! they are taken about the means' centroid; a row very close to an outlying mean loses more
//! digits). With one mean per Gaussian the GPU sums ‖Wx − Wμ‖² directly and agrees to f32
//! rounding. kNN scores lie in [−4, 0] and agree to about 1e-5 absolute. tests/cuda_parity.rs
//! checks every method against the CPU detector at 1e-4 on its error measure. Rankings, hence
//! AUROC and the other metrics, agree far below their reporting digits.

use cudarc::driver::CudaSlice;

use crate::backend::cuda::{distance, matmul, CudaDevice};
use crate::backend::memory_budget::{max_batch_that_fits, HEADROOM_BYTES};
use crate::backend::Activation;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::detector::{Detector, Fitted};
use crate::ood::gaussian::{l2_normalised, Reduce};

/// The methods `CudaScorer` runs; every other method scores on the CPU.
pub const CUDA_METHODS: &[&str] = &["mahalanobis", "mood-v1", "gauss", "mahalanobis-cc", "knn"];

/// Whether `method` has a GPU scorer.
pub fn supported(method: &str) -> bool {
    CUDA_METHODS.contains(&method)
}

/// The per-batch buffers are kept near this size: large enough for full-speed GEMMs (50,000 rows
/// of 1024 features against 1000 means is one batch), small enough to leave the GPU to others.
pub const BATCH_BYTES: usize = 1 << 30;

const MIB: usize = 1 << 20;

/// Rows per batch: as many as `BATCH_BYTES` holds at `per_row` bytes each, fewer if the free
/// memory left after the statistics (`stats` bytes, not yet uploaded) and `HEADROOM_BYTES` holds
/// fewer. An error naming the sizes when the statistics or a single row do not fit.
pub fn batch_rows(method: &str, free: usize, stats: usize, per_row: usize) -> Result<usize> {
    if stats.saturating_add(HEADROOM_BYTES) > free {
        return Err(Error::CudaOutOfMemory(format!(
            "the fitted `{method}` statistics need {} MiB, {} MiB are free",
            stats.div_ceil(MIB),
            free / MIB
        )));
    }
    let fits = max_batch_that_fits(free - stats, per_row, HEADROOM_BYTES);
    if fits == 0 {
        return Err(Error::CudaOutOfMemory(format!(
            "one row of `{method}` scoring needs {} KiB beyond its {} MiB of statistics, {} MiB are free",
            per_row.div_ceil(1024),
            stats.div_ceil(MIB),
            free / MIB
        )));
    }
    Ok((BATCH_BYTES / per_row.max(1)).clamp(1, fits))
}

/// One whitened Gaussian on the device, its means taken about their centroid m̄ = mean_c Wμ_c.
struct Part {
    whiten: CudaSlice<f32>,
    /// −m̄ [R], the bias of z = Wx − m̄
    neg_centre: CudaSlice<f32>,
    /// Wμ_c − m̄ [C, R]
    means: CudaSlice<f32>,
    /// ‖Wμ_c − m̄‖² [C]
    means_sq: CudaSlice<f32>,
    rank: usize,
    classes: usize,
}

/// (−m̄, Wμ_c − m̄, ‖Wμ_c − m̄‖²) of whitened means [C, R], in f64 then rounded: distances do not
/// change under the shift, and the expansion's norms become those about the means' centroid, so
/// a common offset of all features (ViT features have a large one) costs no digits; with one mean
/// (`mood-v1`, `gauss`, each Gaussian of `mahalanobis-cc`) the score is the direct ‖Wx − Wμ‖².
pub fn centred(means: &[f32], r: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if r == 0 {
        return (Vec::new(), Vec::new(), Vec::new());
    }
    let c = means.len() / r;
    let mut centre = vec![0.0f64; r];
    for m in means.chunks_exact(r) {
        centre.iter_mut().zip(m).for_each(|(a, v)| *a += *v as f64);
    }
    centre.iter_mut().for_each(|a| *a /= c.max(1) as f64);
    let shifted: Vec<f64> = means
        .chunks_exact(r)
        .flat_map(|m| m.iter().zip(&centre).map(|(v, a)| *v as f64 - a))
        .collect();
    let sq = shifted
        .chunks_exact(r)
        .map(|m| m.iter().map(|v| v * v).sum::<f64>() as f32)
        .collect();
    (
        centre.iter().map(|a| -a as f32).collect(),
        shifted.iter().map(|&v| v as f32).collect(),
        sq,
    )
}

enum Stats {
    Gaussian {
        normalise: bool,
        parts: Vec<Part>,
    },
    Knn {
        bank: CudaSlice<f32>,
        ones: CudaSlice<f32>,
        n: usize,
        k: usize,
    },
}

/// A fitted detector's statistics resident on a device, ready to score batches of rows.
pub struct CudaScorer<'d> {
    dev: &'d CudaDevice,
    method: String,
    dim: usize,
    stats: Stats,
    batch: usize,
}

impl<'d> CudaScorer<'d> {
    /// Uploads what `det` scores with; None when its method has no GPU scorer (`supported`).
    pub fn new(dev: &'d CudaDevice, det: &Detector) -> Result<Option<CudaScorer<'d>>> {
        let method = det.method().to_string();
        if !supported(&method) {
            return Ok(None);
        }
        let dim = det.header.dim;
        let free = dev.memory()?.0;
        let f = 4; // bytes of an f32
        let (stats, batch) = match det.fitted() {
            Fitted::Gaussian(g) if g.reduce == Reduce::Min => {
                let sizes: Vec<(usize, usize)> =
                    g.parts.iter().map(|p| (p.rank, p.classes())).collect();
                let stats_bytes: usize = sizes.iter().map(|(r, c)| f * (r * dim + c * r + c)).sum();
                let (rmax, cmax) = sizes
                    .iter()
                    .fold((0, 0), |(a, b), &(r, c)| (a.max(r), b.max(c)));
                let per_row = f * (dim + rmax + cmax + 2);
                let batch = batch_rows(&method, free, stats_bytes, per_row)?;
                let parts = g
                    .parts
                    .iter()
                    .map(|p| {
                        let (w, m, _) = p.parts();
                        let (neg_centre, m, mm) = centred(m, p.rank);
                        // A rank-0 Gaussian (constant train features) scores 0 without the GPU.
                        let up =
                            |v: &[f32]| dev.upload(if v.is_empty() { &[0.0f32][..] } else { v });
                        Ok(Part {
                            whiten: up(w)?,
                            neg_centre: up(&neg_centre)?,
                            means: up(&m)?,
                            means_sq: up(&mm)?,
                            rank: p.rank,
                            classes: p.classes(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let stats = Stats::Gaussian {
                    normalise: g.normalise,
                    parts,
                };
                (stats, batch)
            }
            Fitted::Knn(k) => {
                let (bank, n) = k.bank();
                let batch = batch_rows(&method, free, f * (n * dim + n), f * (dim + n + 2))?;
                let stats = Stats::Knn {
                    bank: dev.upload(bank)?,
                    ones: dev.upload(&vec![1.0f32; n])?,
                    n,
                    k: k.k,
                };
                (stats, batch)
            }
            _ => return Ok(None),
        };
        Ok(Some(CudaScorer {
            dev,
            method,
            dim,
            stats,
            batch,
        }))
    }

    /// Rows scored per batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Smaller batches than the memory budget allows (at least 1 row).
    pub fn with_batch(mut self, rows: usize) -> Self {
        self.batch = rows.clamp(1, self.batch);
        self
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    /// The rows as the device scores them: L2-normalised for the methods that normalise.
    pub fn prepare<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        let normalise = match &self.stats {
            Stats::Gaussian { normalise, .. } => *normalise,
            Stats::Knn { .. } => true,
        };
        if normalise {
            std::borrow::Cow::Owned(l2_normalised(x, self.dim))
        } else {
            std::borrow::Cow::Borrowed(x)
        }
    }

    /// The rows x [n, D], `prepare`d, on the device (for `score_resident`).
    pub fn upload(&self, x: &[f32]) -> Result<CudaSlice<f32>> {
        self.dev.upload(&self.prepare(x))
    }

    /// Scores (higher = more in-distribution) of the rows of x [n, D] on the host, batch by batch.
    pub fn score(&self, x: &[f32]) -> Result<Vec<f32>> {
        check_rows(x, self.dim, "features")?;
        let mut out = Vec::with_capacity(x.len() / self.dim);
        for chunk in x.chunks(self.batch * self.dim) {
            let rows = self.upload(chunk)?;
            out.extend(self.score_resident(&rows, chunk.len() / self.dim)?);
        }
        Ok(out)
    }

    /// Scores of `rows` rows already on the device, already `prepare`d; one batch, however many
    /// rows (the caller keeps it within `batch()` to stay inside the memory budget).
    pub fn score_resident(&self, x: &CudaSlice<f32>, rows: usize) -> Result<Vec<f32>> {
        let (dev, d, b) = (self.dev, self.dim, rows);
        if b == 0 {
            return Ok(Vec::new());
        }
        match &self.stats {
            Stats::Gaussian { parts, .. } => {
                let mut best = vec![f32::NEG_INFINITY; b];
                for p in parts {
                    let (r, c) = (p.rank, p.classes);
                    if r == 0 {
                        best.iter_mut().for_each(|v| *v = v.max(0.0));
                        continue;
                    }
                    let mut z = dev.zeros::<f32>(b * r)?;
                    let none = Activation::None;
                    matmul::linear(
                        dev,
                        x,
                        &p.whiten,
                        Some(&p.neg_centre),
                        none,
                        &mut z,
                        (b, d, r),
                    )?;
                    let mut cross = dev.zeros::<f32>(b * c)?;
                    matmul::matmul_nt(dev, &z, &p.means, &mut cross, (b, r, c))?;
                    let mut zz = dev.zeros::<f32>(b)?;
                    distance::row_sqnorm(dev, &z, &mut zz, (b, r))?;
                    let mut s = dev.zeros::<f32>(b)?;
                    distance::mahalanobis_min(dev, &cross, &zz, &p.means_sq, &mut s, (b, c))?;
                    // −min over every Gaussian's classes = the best of the per-Gaussian scores.
                    for (v, s) in best.iter_mut().zip(dev.download(&s)?) {
                        *v = v.max(s);
                    }
                }
                Ok(best)
            }
            Stats::Knn { bank, ones, n, k } => {
                let mut dist = dev.zeros::<f32>(b * n)?;
                matmul::matmul_nt(dev, x, bank, &mut dist, (b, d, *n))?;
                let mut qq = dev.zeros::<f32>(b)?;
                distance::row_sqnorm(dev, x, &mut qq, (b, d))?;
                distance::sqdist_combine(dev, &mut dist, &qq, ones, (b, *n))?;
                let mut kth = dev.zeros::<f32>(b)?;
                distance::kth_smallest(dev, &dist, &mut kth, (b, *n), *k)?;
                Ok(dev.download(&kth)?.into_iter().map(|v| -v).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ood::detector::METHODS;

    #[test]
    fn batches_fill_the_budget_within_free_memory() {
        let gib = 1usize << 30;
        // 50,000 x 1024 against 1000 means: 12 KB a row, so one batch holds them all.
        let per_row = 4 * (1024 + 1024 + 1000 + 2);
        let b = batch_rows("mahalanobis", 80 * gib, 8 << 20, per_row).unwrap();
        assert_eq!(b, BATCH_BYTES / per_row);
        assert!(b >= 50_000, "{b}");
        // Little free memory: what is left after the statistics and the headroom.
        let free = HEADROOM_BYTES + (8 << 20) + 100 * per_row;
        assert_eq!(
            batch_rows("mahalanobis", free, 8 << 20, per_row).unwrap(),
            100
        );
    }

    #[test]
    fn statistics_or_a_row_that_do_not_fit_are_one_line_errors() {
        let e = batch_rows("knn", 512 << 20, 1 << 30, 4096)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("out of GPU memory") && e.contains("1024 MiB"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = batch_rows("knn", HEADROOM_BYTES + 10, 0, 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one row"), "{e}");
    }

    #[test]
    fn centring_keeps_every_distance() {
        let (r, means) = (3, [1.0f32, 2.0, 3.0, 3.0, 2.0, 1.0]);
        let (neg, m, mm) = centred(&means, r);
        assert_eq!(neg, vec![-2.0, -2.0, -2.0]);
        assert_eq!(m, vec![-1.0, 0.0, 1.0, 1.0, 0.0, -1.0]);
        assert_eq!(mm, vec![2.0, 2.0]);
        // ‖z − μ_c‖² = ‖(z − m̄) − (μ_c − m̄)‖²
        let z = [0.5f32, -1.0, 4.0];
        for c in 0..2 {
            let direct: f32 = (0..r).map(|j| (z[j] - means[c * r + j]).powi(2)).sum();
            let shifted: f32 = (0..r).map(|j| (z[j] + neg[j] - m[c * r + j]).powi(2)).sum();
            assert!((direct - shifted).abs() < 1e-5, "{direct} {shifted}");
        }
        // One mean: it becomes the origin.
        let (_, m, mm) = centred(&[0.3, -7.0], 2);
        assert_eq!((m, mm), (vec![0.0, 0.0], vec![0.0]));
        assert_eq!(centred(&[], 0), (vec![], vec![], vec![]), "rank 0");
    }

    /// The GPU algorithm of `score_resident`, step for step in f32 on the CPU's GEMM: what the
    /// device computes up to summation order, so its distance from the CPU detector is the
    /// precision the module doc states.
    fn emulate(det: &Detector, x: &[f32]) -> Vec<f32> {
        use crate::backend::cpu::matmul::linear_nobias;
        let d = det.header.dim;
        let n = x.len() / d;
        match det.fitted() {
            Fitted::Gaussian(g) => {
                let x = if g.normalise {
                    l2_normalised(x, d)
                } else {
                    x.to_vec()
                };
                let mut best = vec![f32::NEG_INFINITY; n];
                for p in &g.parts {
                    let (w, m, _) = p.parts();
                    let (r, c) = (p.rank, p.classes());
                    let (neg, m, mm) = centred(m, r);
                    let mut z = vec![0.0f32; n * r];
                    linear_nobias(&x, w, n, d, r, &mut z);
                    z.chunks_mut(r).for_each(|row| {
                        row.iter_mut().zip(&neg).for_each(|(v, b)| *v += b);
                    });
                    let mut cross = vec![0.0f32; n * c];
                    linear_nobias(&z, &m, n, r, c, &mut cross);
                    for i in 0..n {
                        let zz: f32 = z[i * r..][..r].iter().map(|v| v * v).sum();
                        let min = (0..c)
                            .map(|k| zz - 2.0 * cross[i * c + k] + mm[k])
                            .fold(f32::INFINITY, f32::min);
                        best[i] = best[i].max(-min.max(0.0));
                    }
                }
                best
            }
            Fitted::Knn(k) => {
                let q = l2_normalised(x, d);
                let (bank, nb) = k.bank();
                let mut dots = vec![0.0f32; n * nb];
                linear_nobias(&q, bank, n, d, nb, &mut dots);
                (0..n)
                    .map(|i| {
                        let qq: f32 = q[i * d..][..d].iter().map(|v| v * v).sum();
                        let mut row: Vec<f32> = dots[i * nb..][..nb]
                            .iter()
                            .map(|t| (qq - 2.0 * t + 1.0).max(0.0))
                            .collect();
                        row.sort_by(f32::total_cmp);
                        -row[k.k - 1]
                    })
                    .collect()
            }
            Fitted::Other => unreachable!(),
        }
    }

    #[test]
    fn the_gpu_algorithm_is_within_its_stated_tolerance_of_the_cpu() {
        use crate::ood::detector::{Inputs, Matrix};
        use crate::rng::Rng;
        // tests/cuda_parity.rs's cases: (method, k, (train rows, queries, classes, D)), features
        // with a common offset of 5 and every other query shifted away.
        let cases = [
            ("mahalanobis", "", (4000, 300, 100, 256)),
            ("mahalanobis", "", (40, 50, 5, 64)),
            ("mood-v1", "", (1000, 300, 5, 32)),
            ("gauss", "", (1000, 300, 5, 32)),
            ("mahalanobis-cc", "", (800, 300, 4, 16)),
            ("knn", "50", (3000, 300, 10, 128)),
            ("knn", "1", (500, 301, 10, 64)),
        ];
        for (i, (method, k, (n, m, c, d))) in cases.into_iter().enumerate() {
            let mut rng = Rng::new(1000 + i as u64);
            let means: Vec<f32> = (0..c * d).map(|_| rng.normal() as f32).collect();
            let mut rows = |k: usize, shift: bool| -> Vec<f32> {
                (0..k * d)
                    .map(|e| {
                        let far = shift && (e / d) % 2 == 1;
                        let mu = means[((e / d) % c) * d + e % d];
                        5.0 + if far { 3.0 } else { mu } + rng.normal() as f32
                    })
                    .collect()
            };
            let (train, query) = (rows(n, false), rows(m, true));
            let labels: Vec<usize> = (0..n).map(|i| i % c).collect();
            let args = if k.is_empty() {
                Default::default()
            } else {
                [("k".to_string(), k.to_string())].into()
            };
            let features = |x| Matrix { data: x, cols: d };
            let fit = Inputs {
                features: Some(features(&train)),
                labels: Some(&labels),
                ..Default::default()
            };
            let det = Detector::fit(method, args, &fit).unwrap();
            let want = det
                .score(&Inputs {
                    features: Some(features(&query)),
                    ..Default::default()
                })
                .unwrap();
            let got = emulate(&det, &query);
            let rms = (want.iter().map(|v| v * v).sum::<f32>() / m as f32).sqrt();
            let rel = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / (w.abs() + rms))
                .fold(0.0f32, f32::max);
            println!("{method} {n} {m} {c} {d}: max rel {rel:.2e}");
            assert!(rel < 1e-4, "{method} n={n} C={c} D={d}: max rel {rel:.2e}");
        }
    }

    #[test]
    fn every_gpu_method_is_a_registered_method() {
        for m in CUDA_METHODS {
            assert!(METHODS.iter().any(|r| r.name == *m), "{m}");
        }
        assert!(!supported("mahalanobis-avgcc"), "a mean, not a min");
        assert!(!supported("cos"));
    }
}
