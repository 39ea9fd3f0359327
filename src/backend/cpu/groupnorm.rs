//! Group normalisation on NHWC activations and weight standardisation of convolution kernels, the
//! two normalisations of BiT's ResNet-v2 (src/model/bit.rs):
//!   group_norm:  for image b and group g (channels g·C/G .. (g+1)·C/G), over its H·W·C/G values,
//!                y = (x − mean) / √(var + ε) · γ[c] + β[c]  (biased variance), then ReLU if asked.
//!                Statistics in f64; the result is one multiply-add per value.
//!   standardize: each output channel's kernel w[o, ·] → (w − mean) / √(var + ε) (biased variance,
//!                f64), done once at load instead of at every forward.

use rayon::prelude::*;

/// GroupNorm (+ ReLU) of x [B, H·W, C] (NHWC with the positions flattened), `groups` dividing C.
pub fn group_norm(
    x: &[f32],
    (b, hw, c): (usize, usize, usize),
    groups: usize,
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
    relu: bool,
) -> Vec<f32> {
    assert!(
        groups > 0 && c % groups == 0,
        "group_norm: {c} channels, {groups} groups"
    );
    assert_eq!(x.len(), b * hw * c, "group_norm input");
    assert!(gamma.len() == c && beta.len() == c, "group_norm affine");
    let cpg = c / groups;
    let n = (hw * cpg).max(1) as f64;
    // Per image and channel: scale = γ·rstd and shift = β − mean·γ·rstd of the channel's group.
    let mut scale_shift = vec![(0.0f32, 0.0f32); b * c];
    scale_shift
        .par_chunks_mut(cpg)
        .enumerate()
        .for_each(|(bg, dst)| {
            let (bi, g) = (bg / groups, bg % groups);
            let img = &x[bi * hw * c..(bi + 1) * hw * c];
            let (mut s, mut ss) = (0.0f64, 0.0f64);
            for px in img.chunks_exact(c) {
                for &v in &px[g * cpg..(g + 1) * cpg] {
                    let v = v as f64;
                    s += v;
                    ss += v * v;
                }
            }
            let mean = s / n;
            let var = (ss / n - mean * mean).max(0.0);
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for (j, d) in dst.iter_mut().enumerate() {
                let ch = g * cpg + j;
                let sc = gamma[ch] as f64 * rstd;
                *d = (sc as f32, (beta[ch] as f64 - mean * sc) as f32);
            }
        });
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .enumerate()
        .for_each(|(ci, (o, xi))| {
            for (r, (orow, xrow)) in o.chunks_exact_mut(c).zip(xi.chunks_exact(c)).enumerate() {
                let bi = (ci * 64 + r) / hw.max(1);
                let ss = &scale_shift[bi * c..(bi + 1) * c];
                for ((d, &v), &(sc, sh)) in orow.iter_mut().zip(xrow).zip(ss) {
                    let y = v * sc + sh;
                    *d = if relu { y.max(0.0) } else { y };
                }
            }
        });
    out
}

/// Weight standardisation of `w` [Cout, ...] in place: each output channel's values to zero mean
/// and unit (biased) variance, with `eps` added to the variance.
pub fn standardize(w: &mut [f32], cout: usize, eps: f32) {
    assert!(
        cout > 0 && w.len() % cout == 0,
        "standardize: {} values, {cout} rows",
        w.len()
    );
    let per = w.len() / cout;
    w.par_chunks_mut(per).for_each(|row| {
        let n = per as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        row.iter_mut()
            .for_each(|v| *v = ((*v as f64 - mean) * rstd) as f32);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal() as f32 * 2.0 + 0.5).collect()
    }

    #[test]
    fn group_norm_matches_its_definition() {
        let (b, hw, c, g) = (3, 37, 12, 4);
        let x = rand(b * hw * c, 1);
        let gamma = rand(c, 2);
        let beta = rand(c, 3);
        for relu in [false, true] {
            let got = group_norm(&x, (b, hw, c), g, (&gamma, &beta), 1e-5, relu);
            let cpg = c / g;
            for bi in 0..b {
                for gi in 0..g {
                    let vals: Vec<f64> = (0..hw)
                        .flat_map(|p| (0..cpg).map(move |j| (p, gi * cpg + j)))
                        .map(|(p, ch)| x[(bi * hw + p) * c + ch] as f64)
                        .collect();
                    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                    let var =
                        vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                    for p in 0..hw {
                        for ch in gi * cpg..(gi + 1) * cpg {
                            let i = (bi * hw + p) * c + ch;
                            let mut want = (x[i] as f64 - mean) / (var + 1e-5).sqrt()
                                * gamma[ch] as f64
                                + beta[ch] as f64;
                            if relu {
                                want = want.max(0.0);
                            }
                            assert!((got[i] as f64 - want).abs() < 1e-4, "{} vs {want}", got[i]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn standardized_rows_have_zero_mean_and_unit_variance() {
        let mut w = rand(5 * 27, 4);
        standardize(&mut w, 5, 1e-8);
        for row in w.chunks(27) {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / 27.0;
            let v = row.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / 27.0;
            assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5, "{m} {v}");
        }
    }
}
