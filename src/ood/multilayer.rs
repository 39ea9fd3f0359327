//! The multi-layer methods, on the per-block pooled features of `mood extract --layers`
//! (layers.npy [n, L, D]: for each chosen block, the mean of its output's patch tokens, before any
//! norm). docs/methods.md defines them and says where they differ from OpenOOD.
//!
//! - `mahalanobis-ensemble` (Lee et al., "A Simple Unified Framework for Detecting
//!   Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018; OpenOOD v1.5
//!   mds_ensemble_postprocessor.py): per layer l, class means and one tied covariance of the
//!   class-centred train rows (biased), P_l = pinvh; s_l(x) = max_c −½ (x_l − μ_{l,c})ᵀ P_l
//!   (x_l − μ_{l,c}); score = Σ_l w_l·s_l with OpenOOD's weights (its `alpha_list`, 1 per layer),
//!   or, with `weights=lr`, Lee et al.'s / OpenOOD's logistic regression: a tenth of each
//!   class's train rows (`held_out`) is kept out of the statistics as the ID validation set, the
//!   rows of the store `val_ood` are the OOD one, and w is the coefficient vector (intercept
//!   dropped) of an L2 logistic regression of ID (1) vs OOD (0) on the rows [s_1 … s_L]
//!   (`logistic`: C chosen as LogisticRegressionCV does, or `lr_c`).
//!   Lee et al. and OpenOOD first move the input a step against the gradient of the score
//!   (`noise` 0.0014); that needs the model, which a store does not hold, so mood scores without
//!   it (noise 0). Each layer's distances are `mahalanobis`'s GEMM kernel (`gaussian`).
//! - `gram` (Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML
//!   2020; OpenOOD v1.5 gram_postprocessor.py): OpenOOD hooks every ReLU and convolution output
//!   [C, H, W] and keeps the row sums of its order-p Gram matrices; here each tapped block's
//!   pooled vector x [D] is the activation, a map with one position, whose Gram matrix of order p
//!   is x^p (x^p)ᵀ: g_i = sign(s_i)|s_i|^{1/p}, s_i = x_i^p·Σ_j x_j^p. Per layer, power and class,
//!   the train rows' minimum and maximum of g (a tenth of each class held out); the deviation
//!   δ(g) = Σ_i relu(min_i − g_i)/|min_i + 1e-6| + relu(g_i − max_i)/|max_i + 1e-6|, each layer's
//!   normalised by its mean over the held-out rows; score = −Σ_l Σ_p δ_{l,p,ŷ}(g)/norm_l divided
//!   by the max softmax, ŷ the predicted class. Rows are independent element-wise work (no GEMM).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::gaussian::{GaussianScore, Reduce, Whitened};
use crate::ood::logistic::{self, Logistic};
use crate::ood::stats::Stats;

/// Layer `l` of rows [n, L·D] as its own [n, D] matrix.
fn layer(x: &[f32], l: usize, layers: usize, d: usize) -> Vec<f32> {
    x.par_chunks_exact(layers * d)
        .flat_map_iter(|r| r[l * d..(l + 1) * d].iter().copied())
        .collect()
}

/// The block numbers as stored in a detector file.
fn save_blocks(s: &mut Stats, prefix: &str, blocks: &[usize]) {
    let v: Vec<f32> = blocks.iter().map(|&b| b as f32).collect();
    s.put(&format!("{prefix}.blocks"), &[v.len()], &v);
}

fn load_blocks(s: &Stats, prefix: &str) -> Result<Vec<usize>> {
    let (_, v) = s.get(&format!("{prefix}.blocks"), 1)?;
    Ok(v.iter().map(|&b| b as usize).collect())
}

/// Refuses rows whose blocks are not the fitted ones.
pub fn check_blocks(method: &str, fitted: &[usize], given: &[usize]) -> Result<()> {
    if fitted != given {
        return Err(Error::Data(format!(
            "{method}: the store's layers.npy holds blocks {given:?}, the detector was fitted on blocks {fitted:?}: extract every store with the same --layers"
        )));
    }
    Ok(())
}

/// The per-layer weights of `weights` ("1": every layer 1, OpenOOD's default; or one value per
/// layer, comma-separated).
pub fn parse_weights(s: &str, layers: usize) -> Result<Vec<f64>> {
    let v: Vec<f64> = s
        .split(',')
        .map(|w| w.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Usage(format!("--method-arg weights={s}: not a list of numbers")))?;
    let v = if v.len() == 1 && layers > 1 {
        vec![v[0]; layers]
    } else {
        v
    };
    if v.len() != layers || v.iter().any(|w| !w.is_finite()) {
        return Err(Error::Usage(format!(
            "--method-arg weights={s}: one finite weight, or one per layer ({layers})"
        )));
    }
    Ok(v)
}

pub struct MahalanobisEnsemble {
    pub blocks: Vec<usize>,
    pub dim: usize,
    layers: Vec<GaussianScore>,
    /// The weights of `weights=lr`, fitted with the statistics.
    pub fitted_weights: Option<Vec<f64>>,
}

/// What `weights=lr` fits the weights on: the OOD validation rows [m, L·D] and their blocks,
/// and `lr_c` (None: C by cross-validation).
pub struct LrValidation<'a> {
    pub ood: &'a [f32],
    pub blocks: &'a [usize],
    pub c: Option<f64>,
}

/// `lr_c`: `cv` (LogisticRegressionCV's choice) or a positive number.
pub fn parse_lr_c(s: &str) -> Result<Option<f64>> {
    if s == "cv" {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 => Ok(Some(c)),
        _ => Err(Error::Usage(format!(
            "--method-arg lr_c={s}: `cv` or a number > 0"
        ))),
    }
}

/// The per-block rows of the store at `dir` (`val_ood` of `weights=lr`) and their blocks.
pub fn read_val_ood(dir: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    if dir.is_empty() {
        return Err(Error::Usage(
            "mahalanobis-ensemble weights=lr: name the OOD validation store with --method-arg val_ood=DIR (extracted with the same --layers)".into(),
        ));
    }
    let store = crate::store::FeatureStore::open(std::path::Path::new(dir))?;
    let layers = store.layers.ok_or_else(|| {
        Error::Usage(format!(
            "--method-arg val_ood={dir}: the store has no layers.npy; extract it with --layers"
        ))
    })?;
    Ok((layers.as_slice().to_vec(), store.manifest.layers.clone()))
}

fn plain(part: Whitened) -> GaussianScore {
    GaussianScore {
        normalise: false,
        reduce: Reduce::Min,
        parts: vec![part],
    }
}

impl MahalanobisEnsemble {
    pub fn fit(
        x: &[f32],
        cols: usize,
        blocks: &[usize],
        labels: &[usize],
    ) -> Result<MahalanobisEnsemble> {
        let (l, d) = widths(cols, blocks)?;
        check_rows(x, cols, "train layer features")?;
        let layers = (0..l)
            .map(|k| GaussianScore::tied(&layer(x, k, l, d), labels, d))
            .collect::<Result<_>>()?;
        Ok(MahalanobisEnsemble {
            blocks: blocks.to_vec(),
            dim: d,
            layers,
            fitted_weights: None,
        })
    }

    /// `weights=lr`: the statistics on the train rows but a held-out tenth of each class, and
    /// the weights of a logistic regression of those held-out rows' per-layer scores (ID, 1)
    /// against the validation OOD rows' (0). Also hands back the regression.
    pub fn fit_lr(
        x: &[f32],
        cols: usize,
        blocks: &[usize],
        labels: &[usize],
        val: &LrValidation,
    ) -> Result<(MahalanobisEnsemble, Logistic)> {
        let n = check_rows(x, cols, "train layer features")?;
        if labels.len() != n {
            return Err(Error::Data(format!(
                "mahalanobis-ensemble: {n} train rows but {} labels",
                labels.len()
            )));
        }
        let classes = labels.iter().max().map_or(0, |&c| c + 1);
        let mut seen = vec![0usize; classes];
        let out: Vec<bool> = labels
            .iter()
            .map(|&y| {
                seen[y] += 1;
                held_out(seen[y] - 1)
            })
            .collect();
        let pick = |keep: bool| -> (Vec<f32>, Vec<usize>) {
            let mut rows = Vec::new();
            let mut ys = Vec::new();
            for (i, r) in x.chunks_exact(cols).enumerate() {
                if out[i] != keep {
                    rows.extend_from_slice(r);
                    ys.push(labels[i]);
                }
            }
            (rows, ys)
        };
        let (kept, kept_labels) = pick(true);
        let (id_val, _) = pick(false);
        if id_val.is_empty() {
            return Err(Error::Data(
                "mahalanobis-ensemble weights=lr: no class has 10 train rows, so none is held out as ID validation; use more train rows".into(),
            ));
        }
        let mut m = MahalanobisEnsemble::fit(&kept, cols, blocks, &kept_labels)?;
        check_blocks("mahalanobis-ensemble val_ood", blocks, val.blocks)?;
        let l = blocks.len();
        let id_s = m.layer_scores(&id_val)?;
        let ood_s = m.layer_scores(val.ood)?;
        let t: Vec<bool> = (0..id_s.len() / l)
            .map(|_| true)
            .chain((0..ood_s.len() / l).map(|_| false))
            .collect();
        let rows: Vec<f64> = id_s.into_iter().chain(ood_s).collect();
        let lr = match val.c {
            Some(c) => logistic::fit(&rows, l, &t, c)?,
            None => logistic::fit_cv(&rows, l, &t)?,
        };
        m.fitted_weights = Some(lr.coef.clone());
        Ok((m, lr))
    }

    /// Per-layer scores s_l = max_c −½ (x_l − μ_{l,c})ᵀ P_l (x_l − μ_{l,c}) of rows [n, L·D], as
    /// [n, L].
    pub fn layer_scores(&self, x: &[f32]) -> Result<Vec<f64>> {
        let l = self.blocks.len();
        let n = check_rows(x, l * self.dim, "layer features")?;
        let mut out = vec![0.0f64; n * l];
        for (k, g) in self.layers.iter().enumerate() {
            // GaussianScore gives −min_c d_c = 2·max_c −½ d_c. Block k is read in place.
            let s = g.score_rows(x, n, l * self.dim, k * self.dim);
            for (i, v) in s.iter().enumerate() {
                out[i * l + k] = 0.5 * *v as f64;
            }
        }
        Ok(out)
    }

    /// The weights setting `spec` as per-layer weights: `lr` is the fitted ones.
    pub fn weights(&self, spec: &str) -> Result<Vec<f64>> {
        match (spec, &self.fitted_weights) {
            ("lr", Some(w)) => Ok(w.clone()),
            ("lr", None) => Err(Error::Data(
                "mahalanobis-ensemble: weights=lr, but the detector holds no fitted weights; fit it again with weights=lr".into(),
            )),
            _ => parse_weights(spec, self.blocks.len()),
        }
    }

    pub fn score(&self, x: &[f32], blocks: &[usize], weights: &[f64]) -> Result<Vec<f32>> {
        check_blocks("mahalanobis-ensemble", &self.blocks, blocks)?;
        let l = self.blocks.len();
        let s = self.layer_scores(x)?;
        Ok(s.chunks_exact(l)
            .map(|r| r.iter().zip(weights).map(|(v, w)| v * w).sum::<f64>() as f32)
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        save_blocks(s, "ensemble", &self.blocks);
        for (k, g) in self.layers.iter().enumerate() {
            g.parts[0].save(&format!("ensemble.layer{k}"), s);
        }
        if let Some(w) = &self.fitted_weights {
            let w: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            s.put("ensemble.weights", &[w.len()], &w);
        }
    }

    pub fn load(s: &Stats) -> Result<MahalanobisEnsemble> {
        let blocks = load_blocks(s, "ensemble")?;
        let layers: Vec<GaussianScore> = (0..blocks.len())
            .map(|k| Whitened::load(&format!("ensemble.layer{k}"), s).map(plain))
            .collect::<Result<_>>()?;
        let dim = layers.first().map_or(0, |g| g.dim());
        if layers.is_empty() || layers.iter().any(|g| g.dim() != dim) {
            return Err(Error::Data(
                "mahalanobis-ensemble statistics: layers of different widths".into(),
            ));
        }
        let fitted_weights = match s.contains("ensemble.weights") {
            true => {
                let (_, w) = s.get("ensemble.weights", 1)?;
                if w.len() != blocks.len() {
                    return Err(Error::Data(format!(
                        "mahalanobis-ensemble statistics: {} fitted weights for {} blocks",
                        w.len(),
                        blocks.len()
                    )));
                }
                Some(w.iter().map(|&v| v as f64).collect())
            }
            false => None,
        };
        Ok(MahalanobisEnsemble {
            blocks,
            dim,
            layers,
            fitted_weights,
        })
    }
}

/// (L, D) of rows of width `cols` = L·D, L = blocks.len().
fn widths(cols: usize, blocks: &[usize]) -> Result<(usize, usize)> {
    let l = blocks.len();
    if l == 0 || cols == 0 || cols % l != 0 {
        return Err(Error::Usage(format!(
            "per-block features of width {cols} for {l} blocks: extract the stores with --layers (e.g. --layers 4,8,12)"
        )));
    }
    Ok((l, cols / l))
}

/// The signed p-th root of the row sums of x^p (x^p)ᵀ: s_i = x_i^p·Σ_j x_j^p (in f64).
/// |x_i^p·S|^{1/p} = |x_i|·|S|^{1/p}, so a row takes one root, not one per entry, and the sign
/// is sign(S), times sign(x_i) for odd p.
fn gram_row(x: &[f32], p: i32, out: &mut [f64]) {
    let sum: f64 = x.iter().map(|&v| (v as f64).powi(p)).sum();
    let root = sum.abs().powf(1.0 / p as f64);
    let odd = p % 2 != 0;
    for (o, &v) in out.iter_mut().zip(x) {
        let v = v as f64;
        let sign = if odd { v.signum() } else { 1.0 } * sum.signum();
        *o = sign * v.abs() * root;
    }
}

/// δ(g) against one class's ranges (min, max).
fn deviation(g: &[f64], min: &[f32], max: &[f32]) -> f64 {
    // Most entries lie inside their range and add nothing: only those outside pay a division.
    let mut sum = 0.0f64;
    for (&v, (&lo, &hi)) in g.iter().zip(min.iter().zip(max)) {
        let (lo, hi) = (lo as f64, hi as f64);
        if v < lo {
            sum += (lo - v) / (lo + 1e-6).abs();
        }
        if v > hi {
            sum += (v - hi) / (hi + 1e-6).abs();
        }
    }
    sum
}

/// Row i of the rows of one class (in store order) is held out when ⌊(i+1)/10⌋ > ⌊i/10⌋.
fn held_out(i: usize) -> bool {
    (i + 1) / 10 > i / 10
}

pub struct Gram {
    pub blocks: Vec<usize>,
    pub dim: usize,
    pub classes: usize,
    pub powers: Vec<i32>,
    /// [L, P, C, D] minima and maxima of the train rows' Gram features.
    mins: Vec<f32>,
    maxs: Vec<f32>,
    /// [L] the mean held-out deviation of each layer.
    norms: Vec<f32>,
}

/// `powers`: a comma-separated list of positive integer orders (OpenOOD: 1,2,3,4,5).
pub fn parse_powers(s: &str) -> Result<Vec<i32>> {
    let v: Vec<i32> = s
        .split(',')
        .map(|p| p.trim().parse::<i32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Usage(format!("--method-arg powers={s}: not a list of integers")))?;
    if v.is_empty() || v.iter().any(|&p| !(1..=10).contains(&p)) {
        return Err(Error::Usage(format!(
            "--method-arg powers={s}: orders from 1 to 10"
        )));
    }
    Ok(v)
}

impl Gram {
    pub fn fit(
        x: &[f32],
        cols: usize,
        blocks: &[usize],
        labels: &[usize],
        classes: usize,
        powers: &[i32],
    ) -> Result<Gram> {
        let (l, d) = widths(cols, blocks)?;
        let n = check_rows(x, cols, "train layer features")?;
        if labels.len() != n {
            return Err(Error::Data(format!(
                "gram: {n} train rows but {} labels",
                labels.len()
            )));
        }
        if let Some(i) = labels.iter().position(|&y| y >= classes) {
            return Err(Error::Data(format!(
                "gram: train row {i} has label {}, but the logits have {classes} classes",
                labels[i]
            )));
        }
        // Each row's rank within its class decides whether it is held out.
        let mut seen = vec![0usize; classes];
        let out: Vec<bool> = labels
            .iter()
            .map(|&y| {
                seen[y] += 1;
                held_out(seen[y] - 1)
            })
            .collect();
        if let Some(c) = (0..classes).find(|&c| seen[c] - seen[c] / 10 == 0) {
            return Err(Error::Data(format!(
                "gram: class {c} of the {classes} logits has no train rows: its ranges, against which rows predicted as {c} are measured, would be empty; fit on a train store whose labels cover every class of the head"
            )));
        }
        let np = powers.len();
        let per = |k: usize, j: usize, c: usize| ((k * np + j) * classes + c) * d;
        let mut mins = vec![f32::INFINITY; l * np * classes * d];
        let mut maxs = vec![f32::NEG_INFINITY; l * np * classes * d];
        // Ranges: every (layer, power) over the kept rows, in parallel over (layer, power).
        let ranges: Vec<(Vec<f64>, Vec<f64>)> = (0..l * np)
            .into_par_iter()
            .map(|kj| {
                let (k, j) = (kj / np, kj % np);
                let mut lo = vec![f64::INFINITY; classes * d];
                let mut hi = vec![f64::NEG_INFINITY; classes * d];
                let mut g = vec![0.0f64; d];
                for (i, r) in x.chunks_exact(cols).enumerate() {
                    if out[i] {
                        continue;
                    }
                    gram_row(&r[k * d..(k + 1) * d], powers[j], &mut g);
                    let y = labels[i];
                    for t in 0..d {
                        lo[y * d + t] = lo[y * d + t].min(g[t]);
                        hi[y * d + t] = hi[y * d + t].max(g[t]);
                    }
                }
                (lo, hi)
            })
            .collect();
        for (kj, (lo, hi)) in ranges.iter().enumerate() {
            let at = per(kj / np, kj % np, 0);
            for (m, v) in mins[at..at + classes * d].iter_mut().zip(lo) {
                *m = *v as f32;
            }
            for (m, v) in maxs[at..at + classes * d].iter_mut().zip(hi) {
                *m = *v as f32;
            }
        }
        let mut gram = Gram {
            blocks: blocks.to_vec(),
            dim: d,
            classes,
            powers: powers.to_vec(),
            mins,
            maxs,
            norms: vec![1.0; l],
        };
        let val: Vec<usize> = (0..n).filter(|&i| out[i]).collect();
        if val.is_empty() {
            return Err(Error::Data(
                "gram: no class has 10 train rows, so none is held out to normalise the deviations; use more train rows".into(),
            ));
        }
        let mut norms = vec![0.0f64; l];
        for &i in &val {
            let dev = gram.deviations(&x[i * cols..(i + 1) * cols], labels[i]);
            norms.iter_mut().zip(&dev).for_each(|(s, v)| *s += v);
        }
        for (k, s) in norms.iter().enumerate() {
            let m = s / val.len() as f64;
            if !(m > 0.0 && m.is_finite()) {
                return Err(Error::Data(format!(
                    "gram: the held-out train rows lie inside the train ranges at block {} (mean deviation {m}), so its deviations cannot be normalised; use more train rows",
                    blocks[k]
                )));
            }
            gram.norms[k] = m as f32;
        }
        Ok(gram)
    }

    /// Σ_p δ against class `c`'s ranges, per layer, of one row [L·D].
    fn deviations(&self, row: &[f32], c: usize) -> Vec<f64> {
        let (d, np) = (self.dim, self.powers.len());
        let mut g = vec![0.0f64; d];
        (0..self.blocks.len())
            .map(|k| {
                (0..np)
                    .map(|j| {
                        gram_row(&row[k * d..(k + 1) * d], self.powers[j], &mut g);
                        let at = ((k * np + j) * self.classes + c) * d;
                        deviation(&g, &self.mins[at..at + d], &self.maxs[at..at + d])
                    })
                    .sum()
            })
            .collect()
    }

    /// Scores of rows [n, L·D] with their logits [n, C].
    pub fn score(&self, x: &[f32], blocks: &[usize], z: &[f32], c: usize) -> Result<Vec<f32>> {
        check_blocks("gram", &self.blocks, blocks)?;
        let cols = self.blocks.len() * self.dim;
        let n = check_rows(x, cols, "layer features")?;
        check_rows(z, c, "logits")?;
        if c != self.classes || z.len() / c != n {
            return Err(Error::Data(format!(
                "gram: {n} rows with {} logit rows of {c} classes; the detector has {} classes",
                z.len() / c.max(1),
                self.classes
            )));
        }
        Ok(x.par_chunks_exact(cols)
            .zip(z.par_chunks_exact(c))
            .map(|(r, zr)| {
                let top = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let pred = (0..c).fold(0, |b, k| if zr[k] > zr[b] { k } else { b });
                let conf = 1.0 / crate::ood::logits::sum_exp_shifted(zr, 1.0, top);
                let dev: f64 = self
                    .deviations(r, pred)
                    .iter()
                    .zip(&self.norms)
                    .map(|(v, &m)| v / m as f64)
                    .sum();
                (-dev / conf) as f32
            })
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        save_blocks(s, "gram", &self.blocks);
        let (l, np) = (self.blocks.len(), self.powers.len());
        let shape = [l, np, self.classes, self.dim];
        s.put("gram.mins", &shape, &self.mins);
        s.put("gram.maxs", &shape, &self.maxs);
        s.put("gram.norms", &[l], &self.norms);
    }

    pub fn load(s: &Stats, powers: &[i32]) -> Result<Gram> {
        let blocks = load_blocks(s, "gram")?;
        let (shape, mins) = s.get("gram.mins", 4)?;
        let (shape2, maxs) = s.get("gram.maxs", 4)?;
        let (_, norms) = s.get("gram.norms", 1)?;
        if shape != shape2
            || shape[0] != blocks.len()
            || shape[1] != powers.len()
            || norms.len() != blocks.len()
        {
            return Err(Error::Data(format!(
                "gram statistics: ranges {shape:?} / {shape2:?}, {} norms, {} blocks and {} powers disagree",
                norms.len(),
                blocks.len(),
                powers.len()
            )));
        }
        Ok(Gram {
            blocks,
            dim: shape[3],
            classes: shape[2],
            powers: powers.to_vec(),
            mins,
            maxs,
            norms,
        })
    }
}
