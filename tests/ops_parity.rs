//! Every CPU op against its plain reference (f64 accumulation, written as the textbook loop), on a
//! table of shapes that includes N = 197, odd sizes, batch 1 and large-magnitude inputs. The CUDA
//! backend will run the same table against the CPU op.

use mood::backend::cpu::{attention, layernorm, matmul, patch_embed, vecmath};
use mood::backend::{self, Activation};
use mood::model::init::Rng;
use mood::Tensor;

fn randn(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32 * scale).collect()
}

/// |a − b| ≤ atol + rtol·|b| for every element, reporting the first failure.
fn assert_close(ours: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= atol + rtol * b.abs(),
            "{what}: index {i}: ours {a}, reference {b}, |diff| {}",
            (a - b).abs()
        );
    }
}

#[test]
fn linear_matches_reference() {
    for &(m, k, n) in &[
        (1, 1, 1),
        (7, 33, 5),
        (197, 64, 48),
        (64, 768, 130),
        (3, 3072, 17),
    ] {
        let x = randn(m * k, 1.0, 1);
        let w = randn(n * k, 0.05, 2);
        let mut out = vec![0.0; m * n];
        matmul::linear_nobias(&x, &w, m, k, n, &mut out);
        let want = matmul::linear_reference(&x, &w, m, k, n);
        assert_close(&out, &want, 1e-5, 1e-4, &format!("linear {m}x{k}x{n}"));
    }
}

#[test]
fn linear_bias_gelu_epilogue_matches_reference() {
    let (m, k, n) = (19, 40, 37);
    let x = randn(m * k, 1.0, 3);
    let w = randn(n * k, 0.3, 4);
    let b = randn(n, 0.5, 5);
    let t = |s: &[usize], v: &Vec<f32>| Tensor::from_vec(s, v.clone()).unwrap();
    let y = backend::linear(
        &t(&[m, k], &x),
        &t(&[n, k], &w),
        Some(&t(&[n], &b)),
        Activation::Gelu,
    )
    .unwrap();
    let lin = matmul::linear_reference(&x, &w, m, k, n);
    let want: Vec<f32> = lin
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let z = (*v + b[i % n]) as f64;
            (0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2))) as f32
        })
        .collect();
    assert_close(y.as_slice(), &want, 1e-5, 1e-4, "linear+bias+gelu");
}

#[test]
fn layernorm_matches_reference_including_large_mean() {
    for &(m, d, offset) in &[
        (1, 8, 0.0),
        (197, 768, 0.0),
        (5, 1024, 1e4),
        (3, 50, -300.0),
    ] {
        let mut x = randn(m * d, 1.0, 6);
        x.iter_mut().for_each(|v| *v += offset);
        let g = randn(d, 1.0, 7);
        let b = randn(d, 1.0, 8);
        let mut out = vec![0.0; m * d];
        layernorm::forward(&x, &g, &b, 1e-6, &mut out);
        let want = layernorm::reference(&x, &g, &b, 1e-6);
        // With |mean| = 1e4 the f32 input itself carries ~1e-3 absolute error per element.
        let atol = if offset.abs() > 1e3 { 2e-3 } else { 2e-5 };
        assert_close(
            &out,
            &want,
            atol,
            1e-4,
            &format!("layernorm {m}x{d} offset {offset}"),
        );
    }
}

#[test]
fn attention_matches_reference() {
    for &(b, n, h, dh, with_bias) in &[
        (1, 197, 2, 64, true),
        (2, 17, 3, 16, true),
        (2, 50, 4, 8, false),
        (1, 1, 1, 4, true),
    ] {
        let d = h * dh;
        let qkv = randn(b * n * 3 * d, 1.0, 9);
        let bias = randn(h * n * n, 1.0, 10);
        let bias = with_bias.then_some(bias.as_slice());
        let dims = attention::Dims { b, n, h, dh };
        let mut out = vec![0.0; b * n * d];
        attention::forward(&qkv, bias, &dims, &mut out);
        let want = attention::reference(&qkv, bias, &dims);
        assert_close(
            &out,
            &want,
            1e-5,
            1e-4,
            &format!("attention b{b} n{n} h{h} dh{dh}"),
        );
    }
}

#[test]
fn softmax_matches_reference_and_survives_large_logits() {
    let n = 197;
    for scale in [1.0f32, 30.0, 1e3] {
        let x = randn(5 * n, scale, 11);
        let mut ours = x.clone();
        vecmath::softmax_rows(&mut ours, None, n);
        for r in 0..5 {
            let row = &x[r * n..(r + 1) * n];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            let want: Vec<f32> = row
                .iter()
                .map(|&v| ((v as f64 - m).exp() / z) as f32)
                .collect();
            assert_close(
                &ours[r * n..(r + 1) * n],
                &want,
                1e-7,
                1e-5,
                &format!("softmax scale {scale}"),
            );
        }
    }
}

#[test]
fn patch_embed_matches_direct_convolution() {
    let (b, c, s, p, d) = (2, 3, 32, 8, 5);
    let img = randn(b * c * s * s, 1.0, 12);
    let w = randn(d * c * p * p, 0.1, 13);
    let bias = randn(d, 0.1, 14);
    let t = |sh: &[usize], v: &Vec<f32>| Tensor::from_vec(sh, v.clone()).unwrap();
    let y = backend::patch_embed(
        &t(&[b, c, s, s], &img),
        &t(&[d, c, p, p], &w),
        &t(&[d], &bias),
    )
    .unwrap();
    let g = s / p;
    assert_eq!(y.shape(), &[b * g * g, d]);
    let cols = patch_embed::im2col(&img, b, c, s, s, p);
    assert_eq!(cols.len(), b * g * g * c * p * p);
    for im in 0..b {
        for gy in 0..g {
            for gx in 0..g {
                for o in 0..d {
                    let mut acc = bias[o] as f64;
                    for ch in 0..c {
                        for i in 0..p {
                            for j in 0..p {
                                let pix =
                                    img[((im * c + ch) * s + gy * p + i) * s + gx * p + j] as f64;
                                acc += pix * w[((o * c + ch) * p + i) * p + j] as f64;
                            }
                        }
                    }
                    let got = y.as_slice()[((im * g + gy) * g + gx) * d + o];
                    assert!(
                        (got as f64 - acc).abs() < 1e-4,
                        "patch ({im},{gy},{gx}) ch {o}: {got} vs {acc}"
                    );
                }
            }
        }
    }
}

/// The vectorised routines exist in three builds (AVX-512, AVX2+FMA, baseline x86-64), picked by
/// the CPU; the tests above only reach the best one. Here each build this CPU can run is checked
/// against f64 references: softmax with a bias, LayerNorm forward and backward, GELU and its
/// derivative, one AdamW update.
#[test]
fn every_simd_build_matches_references() {
    use vecmath::SimdLevel;
    let (rows, n, d) = (7, 197, 768);
    let scores = randn(rows * n, 4.0, 40);
    let bias = randn(rows * n, 1.0, 41);
    let x = randn(rows * d, 2.0, 42);
    let dy = randn(rows * d, 1.0, 43);
    let gamma = randn(d, 1.0, 44);
    let beta = randn(d, 1.0, 45);
    let phi = |v: f64| (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let cdf = |v: f64| 0.5 * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
    let best = vecmath::simd_level();
    let mut levels = vec![SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512];
    levels.retain(|l| *l <= best);
    for level in levels {
        vecmath::cap_simd_level(Some(level));
        assert_eq!(vecmath::simd_level(), level);
        let what = |op: &str| format!("{op} at {level:?}");

        let mut ours = scores.clone();
        vecmath::softmax_rows(&mut ours, Some(&bias), n * rows);
        let biased: Vec<f64> = scores
            .iter()
            .zip(&bias)
            .map(|(s, b)| (s + b) as f64)
            .collect();
        let m = biased.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = biased.iter().map(|v| (v - m).exp()).sum();
        let want: Vec<f32> = biased.iter().map(|v| ((v - m).exp() / z) as f32).collect();
        assert_close(&ours, &want, 1e-8, 1e-5, &what("softmax"));

        let mut out = vec![0.0; rows * d];
        layernorm::forward(&x, &gamma, &beta, 1e-6, &mut out);
        let want = layernorm::reference(&x, &gamma, &beta, 1e-6);
        assert_close(&out, &want, 1e-5, 1e-4, &what("layernorm"));

        let (dx, dgamma, dbeta) = layernorm::backward(&x, &gamma, 1e-6, &dy);
        let (mut want_dx, mut want_dg, mut want_db) =
            (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d]);
        for r in 0..rows {
            let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
            let g: Vec<f64> = (0..d).map(|i| (dy[r * d + i] * gamma[i]) as f64).collect();
            let mean = xr.iter().sum::<f64>() / d as f64;
            let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + 1e-6).sqrt();
            let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * inv).collect();
            let mg = g.iter().sum::<f64>() / d as f64;
            let mgx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            for i in 0..d {
                want_dx[r * d + i] = (inv * (g[i] - mg - xhat[i] * mgx)) as f32;
                want_dg[i] += (dy[r * d + i] as f64 * xhat[i]) as f32;
                want_db[i] += dy[r * d + i];
            }
        }
        assert_close(&dx, &want_dx, 1e-5, 1e-4, &what("layernorm dx"));
        assert_close(&dgamma, &want_dg, 1e-4, 1e-4, &what("layernorm dgamma"));
        assert_close(&dbeta, &want_db, 1e-5, 1e-5, &what("layernorm dbeta"));

        let mut gelu = x.clone();
        vecmath::bias_gelu_rows(&mut gelu, &beta);
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let v = (v + beta[i % d]) as f64;
                (v * cdf(v)) as f32
            })
            .collect();
        assert_close(&gelu, &want, 1e-6, 1e-5, &what("bias+gelu"));

        let mut grad = dy.clone();
        vecmath::gelu_backward_inplace(&x, &mut grad);
        let want: Vec<f32> = x
            .iter()
            .zip(&dy)
            .map(|(&v, &g)| (g as f64 * (cdf(v as f64) + v as f64 * phi(v as f64))) as f32)
            .collect();
        assert_close(&grad, &want, 1e-6, 1e-5, &what("gelu backward"));

        let c = vecmath::AdamwCoefs {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay: 1.0 - 1e-3 * 0.05,
            step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
            sqrt_bc2: (1.0 - 0.999f32.powi(3)).sqrt(),
            grad_scale: 0.7,
        };
        let (mut p, mut m, mut v) = (x.clone(), dy.clone(), gamma.repeat(rows));
        v.iter_mut().for_each(|e| *e = e.abs() * 1e-3);
        let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
        vecmath::adamw_update(&mut p, &beta, &mut m[..d], &mut v[..d], c);
        let (mut want_p, mut want_m, mut want_v) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..d {
            let g = beta[i] as f64 * c.grad_scale as f64;
            // The f32 constants as they are (0.999 is not exact in f32), in f64 arithmetic.
            let (b1, b2) = (c.beta1 as f64, c.beta2 as f64);
            let mi = b1 * m0[i] as f64 + (1.0 - b1) * g;
            let vi = b2 * v0[i] as f64 + (1.0 - b2) * g * g;
            let pi = p0[i] as f64 * c.decay as f64
                - c.step_size as f64 * mi / (vi.sqrt() / c.sqrt_bc2 as f64 + c.eps as f64);
            want_m.push(mi as f32);
            want_v.push(vi as f32);
            want_p.push(pi as f32);
        }
        assert_close(&m[..d], &want_m, 1e-7, 1e-5, &what("adamw m"));
        assert_close(&v[..d], &want_v, 1e-9, 1e-5, &what("adamw v"));
        assert_close(&p[..d], &want_p, 1e-6, 1e-5, &what("adamw p"));
        assert_eq!(&p[d..], &p0[d..], "adamw wrote past its gradient");
    }
    vecmath::cap_simd_level(None);
}
