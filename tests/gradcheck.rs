//! Backward ops against central finite differences. For an op y = f(x) and a random projection r,
//! L(x) = Σ r ⊙ f(x); the backward op given dy = r must return ∂L/∂x. L is evaluated with the
//! plain f64-accumulating references (their f32 outputs carry ~1e-7 relative rounding), at 48
//! random coordinates of each input, h = 1e-2 (the references are smooth at that scale).

use mood::backend::cpu::{attention, layernorm, matmul, vecmath};
use mood::model::init::Rng;

fn randn(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32 * scale).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Compares `analytic` with central differences of `loss` over `x` at sampled coordinates.
fn check(what: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let rms =
        (analytic.iter().map(|g| (*g as f64).powi(2)).sum::<f64>() / analytic.len() as f64).sqrt();
    let mut rng = Rng::new(99);
    let h = 1e-2f32;
    for _ in 0..48 {
        let i = (rng.next_u64() % x.len() as u64) as usize;
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        let num = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
        let ana = analytic[i] as f64;
        let tol = 2e-3 * (ana.abs() + rms) + 1e-5;
        assert!(
            (num - ana).abs() <= tol,
            "{what}[{i}]: analytic {ana}, numeric {num} (rms {rms})"
        );
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let (m, k, n) = (7, 13, 5);
    let x = randn(m * k, 1.0, 1);
    let w = randn(n * k, 0.5, 2);
    let r = randn(m * n, 1.0, 3);
    let (dx, dw, db) = matmul::linear_backward(&x, &w, &r, m, k, n);
    check("linear dx", &x, &dx, |x| {
        dot(&matmul::linear_reference(x, &w, m, k, n), &r)
    });
    check("linear dw", &w, &dw, |w| {
        dot(&matmul::linear_reference(&x, w, m, k, n), &r)
    });
    let want_db: Vec<f32> = (0..n).map(|j| (0..m).map(|i| r[i * n + j]).sum()).collect();
    for (a, b) in db.iter().zip(&want_db) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let (m, d) = (6, 24);
    let x = randn(m * d, 2.0, 4);
    let g = randn(d, 1.0, 5);
    let b = randn(d, 1.0, 6);
    let r = randn(m * d, 1.0, 7);
    let (dx, dg, db) = layernorm::backward(&x, &g, 1e-6, &r);
    check("layernorm dx", &x, &dx, |x| {
        dot(&layernorm::reference(x, &g, &b, 1e-6), &r)
    });
    check("layernorm dgamma", &g, &dg, |g| {
        dot(&layernorm::reference(&x, g, &b, 1e-6), &r)
    });
    check("layernorm dbeta", &b, &db, |b| {
        dot(&layernorm::reference(&x, &g, b, 1e-6), &r)
    });
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let x = randn(200, 2.0, 8);
    let r = randn(200, 1.0, 9);
    let mut dx = vec![0.0; 200];
    vecmath::gelu_backward(&x, &r, &mut dx);
    let gelu64 = |v: f32| {
        let v = v as f64;
        0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))
    };
    check("gelu dx", &x, &dx, |x| {
        x.iter()
            .zip(&r)
            .map(|(v, rr)| gelu64(*v) * *rr as f64)
            .sum()
    });
}

#[test]
fn attention_backward_matches_finite_differences() {
    for &(b, n, h, dh) in &[(2, 5, 2, 4), (1, 17, 3, 8)] {
        let dims = attention::Dims { b, n, h, dh };
        let d = h * dh;
        let qkv = randn(b * n * 3 * d, 0.7, 10);
        let bias = randn(h * n * n, 0.5, 11);
        let r = randn(b * n * d, 1.0, 12);
        let (dqkv, dbias) = attention::backward(&qkv, Some(&bias), &dims, &r);
        check("attention dqkv", &qkv, &dqkv, |q| {
            dot(&attention::reference(q, Some(&bias), &dims), &r)
        });
        let dbias = dbias.expect("bias gradient");
        check("attention dbias", &bias, &dbias, |bb| {
            dot(&attention::reference(&qkv, Some(bb), &dims), &r)
        });
        let (dq2, none) = attention::backward(&qkv, None, &dims, &r);
        assert!(none.is_none());
        check("attention dqkv (no bias)", &qkv, &dq2, |q| {
            dot(&attention::reference(q, None, &dims), &r)
        });
    }
}
