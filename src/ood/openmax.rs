//! OpenMax (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016; OpenOOD v1.5
//! openmax_postprocessor.py), on the logits z [C] as OpenOOD applies it (its activation vectors
//! are the network's outputs).
//!
//! Fit, from the train rows whose argmax equals their label (the correctly classified ones):
//! - MAV_c = the mean logit vector of class c's correct rows;
//! - d(z, MAV_c) = ‖z − MAV_c‖ (`distance=euclidean`, what OpenOOD's postprocessor passes), or
//!   0.5·‖z − MAV_c‖ + (1 − z·MAV_c / (‖z‖‖MAV_c‖)) (`eucos`, libMR OpenMax's default);
//! - a Weibull per class on the `tailsize` largest distances of its correct rows to MAV_c (all of
//!   them when fewer), fitted as libMR's `MetaRecognition::FitHigh` (translate amount 1, no
//!   scores dropped): with s = the smallest tail value, the shifted tail t_i = d_i + 1 − s (≥ 1)
//!   gets the maximum likelihood Weibull (scale λ, shape k), computed as weibull.c does, on
//!   y = ln t rescaled to x = (y − max y)/(max y − min y) ∈ [−1, 0]: the Gumbel scale σ is the
//!   root of σ + mean(x) − Σ x e^{x/σ} / Σ e^{x/σ} (increasing in σ, so one root, found here by
//!   bisection to the last bit where libMR stops its Brent search at 1e-6), the location
//!   μ = σ ln mean(e^{x/σ}); back on the log scale μ' = rμ + max y, σ' = rσ (r the range), and
//!   λ = e^{μ'}, k = 1/σ'.
//!
//! W_c(d) = 1 − exp(−((d + 1 − s)/λ)^k), 0 where d + 1 − s < 0 (libMR's W_score = its CDF).
//!
//! Score of a row z: the `alpha` largest logits, ranked r = 1..α, get ω = (α + 1 − r)/α (others
//! 0); z'_c = z_c·(1 − ω_c·W_c(d(z, MAV_c))), u = Σ_c (z_c − z'_c); the score is
//! −exp(u) / (Σ_c exp(z'_c) + exp(u)), minus the probability of the unknown class (OpenOOD's
//! conf). Only the α ranked classes change, so a row needs α distances, not C: the scoring is
//! a top-α selection and α·C multiply-adds per row, no GEMM. The softmax is taken after
//! subtracting the largest term (OpenOOD exponentiates directly, which overflows past z ≈ 709).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::stats::Stats;

/// How a logit vector's distance to a class's MAV is measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpenMaxDistance {
    Euclidean,
    EuCos,
}

impl OpenMaxDistance {
    pub fn parse(s: &str) -> Result<OpenMaxDistance> {
        match s {
            "euclidean" => Ok(OpenMaxDistance::Euclidean),
            "eucos" => Ok(OpenMaxDistance::EuCos),
            _ => Err(Error::Usage(format!(
                "--method-arg distance={s}: expected euclidean or eucos"
            ))),
        }
    }

    fn of(self, z: &[f32], mav: &[f32]) -> f64 {
        let (mut dd, mut zm, mut zz, mut mm) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in z.iter().zip(mav) {
            let (a, b) = (a as f64, b as f64);
            dd += (a - b) * (a - b);
            zm += a * b;
            zz += a * a;
            mm += b * b;
        }
        match self {
            OpenMaxDistance::Euclidean => dd.sqrt(),
            OpenMaxDistance::EuCos => 0.5 * dd.sqrt() + (1.0 - zm / (zz.sqrt() * mm.sqrt())),
        }
    }
}

/// One class's Weibull: scale λ, shape k and the shift s (the smallest tail value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weibull {
    pub scale: f64,
    pub shape: f64,
    pub small: f64,
}

impl Weibull {
    /// libMR's FitHigh on all of `tail` (see the module doc). Refuses fewer than 2 values or a
    /// tail whose values are all equal (libMR's fit fails there too, and its W-score is then
    /// -9999).
    pub fn fit_high(tail: &[f64]) -> Result<Weibull> {
        let small = tail.iter().copied().fold(f64::INFINITY, f64::min);
        let y: Vec<f64> = tail.iter().map(|&v| (v + 1.0 - small).ln()).collect();
        let top = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let range = top - y.iter().copied().fold(f64::INFINITY, f64::min);
        if tail.len() < 2 || !(range.is_finite() && range > 0.0) {
            return Err(Error::Data(format!(
                "a Weibull fit needs at least 2 distinct tail values, got {} value(s) spanning {}",
                tail.len(),
                if range.is_finite() { range } else { 0.0 }
            )));
        }
        let x: Vec<f64> = y.iter().map(|v| (v - top) / range).collect();
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        // f(σ) = σ + mean − Σ x e^{x/σ} / Σ e^{x/σ}: f' = 1 + Var_w(x)/σ² > 0. x ∈ [−1, 0], so
        // e^{x/σ} ∈ (0, 1] never overflows; it underflows only for σ far below the root.
        let f = |s: f64| {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for &v in &x {
                let e = (v / s).exp();
                num += v * e;
                den += e;
            }
            s + mean - num / den
        };
        let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt();
        let start = 6f64.sqrt() * sd / std::f64::consts::PI;
        let (mut lo, mut hi) = (start, start);
        while f(lo) > 0.0 {
            lo *= 0.5;
            if lo < f64::MIN_POSITIVE {
                return Err(Error::Data("the Weibull fit did not converge".into()));
            }
        }
        while f(hi) < 0.0 {
            hi *= 2.0;
            if !hi.is_finite() {
                return Err(Error::Data("the Weibull fit did not converge".into()));
            }
        }
        // Bisection until the bracket stops shrinking: the root to the last bit.
        loop {
            let mid = 0.5 * (lo + hi);
            if mid <= lo || mid >= hi {
                break;
            }
            if f(mid) < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let sigma = if f(lo).abs() <= f(hi).abs() { lo } else { hi };
        let mu = sigma * (x.iter().map(|v| (v / sigma).exp()).sum::<f64>() / x.len() as f64).ln();
        let (mu, sigma) = (range * mu + top, range * sigma);
        Ok(Weibull {
            scale: mu.exp(),
            shape: 1.0 / sigma,
            small,
        })
    }

    /// libMR's W_score: the Weibull CDF at the shifted distance.
    pub fn w_score(&self, d: f64) -> f64 {
        let t = d + 1.0 - self.small;
        if t < 0.0 {
            return 0.0;
        }
        1.0 - (-(t / self.scale).powf(self.shape)).exp()
    }

    /// As stored in a detector file (f32, so a saved and loaded detector scores the same).
    fn rounded(self) -> Weibull {
        Weibull {
            scale: self.scale as f32 as f64,
            shape: self.shape as f32 as f64,
            small: self.small as f32 as f64,
        }
    }
}

pub struct OpenMax {
    pub classes: usize,
    /// [C, C]
    mavs: Vec<f32>,
    weibull: Vec<Weibull>,
    distance: OpenMaxDistance,
}

fn argmax(r: &[f32]) -> usize {
    (0..r.len()).fold(0, |best, k| if r[k] > r[best] { k } else { best })
}

impl OpenMax {
    pub fn fit(
        z: &[f32],
        c: usize,
        labels: &[usize],
        tailsize: usize,
        distance: OpenMaxDistance,
    ) -> Result<OpenMax> {
        let n = check_rows(z, c, "train logits")?;
        if labels.len() != n {
            return Err(Error::Data(format!(
                "openmax: {n} train logit rows but {} labels",
                labels.len()
            )));
        }
        if tailsize < 2 {
            return Err(Error::Usage(format!(
                "--method-arg tailsize={tailsize}: a Weibull fit needs a tail of at least 2"
            )));
        }
        if let Some(i) = labels.iter().position(|&y| y >= c) {
            return Err(Error::Data(format!(
                "openmax: train row {i} has label {}, but the logits have {c} classes",
                labels[i]
            )));
        }
        // The correctly classified rows of each class.
        let mut rows: Vec<Vec<usize>> = vec![Vec::new(); c];
        for (i, (zr, &y)) in z.chunks_exact(c).zip(labels).enumerate() {
            if argmax(zr) == y {
                rows[y].push(i);
            }
        }
        let fitted: Vec<(Vec<f32>, Weibull)> = rows
            .par_iter()
            .enumerate()
            .map(|(k, rows)| {
                if rows.len() < 2 {
                    return Err(Error::Data(format!(
                        "openmax: class {k} has {} correctly classified train row(s); its Weibull fit needs at least 2 (check the head and labels)",
                        rows.len()
                    )));
                }
                let mut mav = vec![0.0f64; c];
                for &i in rows {
                    mav.iter_mut()
                        .zip(&z[i * c..(i + 1) * c])
                        .for_each(|(m, &v)| *m += v as f64);
                }
                let mav: Vec<f32> = mav.iter().map(|m| (m / rows.len() as f64) as f32).collect();
                let mut d: Vec<f64> = rows
                    .iter()
                    .map(|&i| distance.of(&z[i * c..(i + 1) * c], &mav))
                    .collect();
                d.sort_by(|a, b| a.total_cmp(b));
                let tail = &d[d.len().saturating_sub(tailsize)..];
                let w = Weibull::fit_high(tail)
                    .map_err(|e| Error::Data(format!("openmax: class {k}: {e}")))?;
                Ok((mav, w.rounded()))
            })
            .collect::<Result<_>>()?;
        let (mavs, weibull): (Vec<Vec<f32>>, Vec<Weibull>) = fitted.into_iter().unzip();
        Ok(OpenMax {
            classes: c,
            mavs: mavs.concat(),
            weibull,
            distance,
        })
    }

    /// The fitted Weibulls, one per class.
    pub fn weibulls(&self) -> &[Weibull] {
        &self.weibull
    }

    pub fn score(&self, z: &[f32], alpha: usize) -> Result<Vec<f32>> {
        let c = self.classes;
        check_rows(z, c, "logits")?;
        check_alpha(alpha, c)?;
        Ok(z.par_chunks_exact(c)
            .map(|zr| {
                // The α largest logits, largest first (ties: the larger index first, as
                // reversing numpy's ascending argsort gives).
                let mut ranked: Vec<usize> = (0..c).collect();
                let by = |a: &usize, b: &usize| zr[*b].total_cmp(&zr[*a]).then(b.cmp(a));
                if alpha < c {
                    ranked.select_nth_unstable_by(alpha - 1, by);
                    ranked.truncate(alpha);
                }
                ranked.sort_by(by);
                let mut revised: Vec<f64> = zr.iter().map(|&v| v as f64).collect();
                let mut unknown = 0.0f64;
                for (r, &k) in ranked.iter().enumerate() {
                    let omega = (alpha - r) as f64 / alpha as f64;
                    let w = self.weibull[k]
                        .w_score(self.distance.of(zr, &self.mavs[k * c..(k + 1) * c]));
                    let v = zr[k] as f64;
                    revised[k] = v * (1.0 - w * omega);
                    unknown += v - revised[k];
                }
                let top = revised.iter().copied().fold(unknown, f64::max);
                let known: f64 = revised.iter().map(|v| (v - top).exp()).sum();
                let u = (unknown - top).exp();
                (-u / (known + u)) as f32
            })
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        let c = self.classes;
        s.put("openmax.mavs", &[c, c], &self.mavs);
        let w: Vec<f32> = self
            .weibull
            .iter()
            .flat_map(|w| [w.scale as f32, w.shape as f32, w.small as f32])
            .collect();
        s.put("openmax.weibull", &[c, 3], &w);
    }

    pub fn load(s: &Stats, distance: OpenMaxDistance) -> Result<OpenMax> {
        let (shape, mavs) = s.get("openmax.mavs", 2)?;
        let c = shape[0];
        let (ws, w) = s.get("openmax.weibull", 2)?;
        if shape[1] != c || ws != [c, 3] {
            return Err(Error::Data(format!(
                "openmax statistics: MAVs {shape:?} and Weibulls {ws:?} disagree"
            )));
        }
        Ok(OpenMax {
            classes: c,
            mavs,
            weibull: w
                .chunks_exact(3)
                .map(|p| Weibull {
                    scale: p[0] as f64,
                    shape: p[1] as f64,
                    small: p[2] as f64,
                })
                .collect(),
            distance,
        })
    }
}

/// α must rank between 1 and C classes (OpenOOD's weights would not fit otherwise).
pub fn check_alpha(alpha: usize, c: usize) -> Result<()> {
    if alpha == 0 || alpha > c {
        return Err(Error::Usage(format!(
            "--method-arg alpha={alpha}: it must be in 1..={c} (the classes)"
        )));
    }
    Ok(())
}
