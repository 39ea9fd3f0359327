//! Backward ops against central finite differences. For an op y = f(x) and a random projection r,
//! L(x) = Σ r ⊙ f(x); the backward op given dy = r must return ∂L/∂x. L is evaluated with the
//! plain f64-accumulating references (their f32 outputs carry ~1e-7 relative rounding), at 48
//! random coordinates of each input, h = 1e-2 (the references are smooth at that scale).
//!
//! `on_cuda` runs the same checks against the CUDA tape (`Tape<CudaExec<f32>>`, each op recorded
//! and differentiated by the device's launchers), the finite differences still from the CPU
//! references; without a GPU on the CPU stand-in (tests/common/cuda.rs).

#[cfg(feature = "cuda")]
mod common;

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
    for &(b, n, h, dh) in &[(2, 5, 2, 4), (1, 17, 3, 8), (5, 4, 2, 3)] {
        let dims = attention::Dims { b, n, h, dh };
        let d = h * dh;
        let qkv = randn(b * n * 3 * d, 0.7, 10);
        let bias = randn(h * n * n, 0.5, 11);
        let r = randn(b * n * d, 1.0, 12);
        let mut out = vec![0.0; b * n * d];
        let probs = attention::forward_keep_probs(&qkv, Some(&bias), &dims, &mut out);
        let want = attention::reference(&qkv, Some(&bias), &dims);
        assert!(out.iter().zip(&want).all(|(a, w)| (a - w).abs() < 1e-5));
        let (dqkv, dbias) = attention::backward(&qkv, &probs, true, &dims, &r);
        check("attention dqkv", &qkv, &dqkv, |q| {
            dot(&attention::reference(q, Some(&bias), &dims), &r)
        });
        let dbias = dbias.expect("bias gradient");
        check("attention dbias", &bias, &dbias, |bb| {
            dot(&attention::reference(&qkv, Some(bb), &dims), &r)
        });
        let probs = attention::forward_keep_probs(&qkv, None, &dims, &mut out);
        let (dq2, none) = attention::backward(&qkv, &probs, false, &dims, &r);
        assert!(none.is_none());
        check("attention dqkv (no bias)", &qkv, &dq2, |q| {
            dot(&attention::reference(q, None, &dims), &r)
        });
    }
}

#[test]
fn patch_embed_col2im_is_the_adjoint_of_im2col() {
    use mood::backend::cpu::patch_embed::{col2im, im2col};
    let (b, c, s, p) = (2, 3, 16, 4);
    let x = randn(b * c * s * s, 1.0, 20);
    let cols_dir = randn(b * (s / p) * (s / p) * c * p * p, 1.0, 21);
    let lhs = dot(&im2col(&x, b, c, s, s, p), &cols_dir);
    let rhs = dot(&x, &col2im(&cols_dir, b, c, s, s, p));
    assert!(
        (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
}

#[test]
fn residual_layer_scale_backward_matches_finite_differences() {
    use mood::backend::cpu::elementwise::{residual_scaled, residual_scaled_backward};
    let (m, d) = (5, 12);
    let x = randn(m * d, 1.0, 22);
    let y = randn(m * d, 1.0, 23);
    let g = randn(d, 1.0, 24);
    let r = randn(m * d, 1.0, 25);
    let fwd = |y: &[f32], g: &[f32]| {
        let mut out = x.clone();
        residual_scaled(&mut out, y, Some(g), d);
        dot(&out, &r)
    };
    let (dy, dg) = residual_scaled_backward(&y, Some(&g), &r, d);
    check("residual dy", &y, &dy, |y| fwd(y, &g));
    check("residual dgamma", &g, &dg.unwrap(), |g| fwd(&y, g));
}

#[test]
fn mean_pool_and_relpos_scatter_backward_match_finite_differences() {
    use mood::backend::cpu::reduce::{mean_tokens, mean_tokens_backward};
    use mood::model::relpos::{
        gather_bias, num_relative_distance, relative_position_index, scatter_bias_grad,
    };
    let (b, n, d) = (2, 5, 3);
    let x = randn(b * n * d, 1.0, 26);
    let r = randn(b * d, 1.0, 27);
    let dx = mean_tokens_backward(&r, b, n, d, 1);
    check("mean pool", &x, &dx, |x| {
        dot(&mean_tokens(x, b, n, d, 1), &r)
    });

    let (wh, ww, heads) = (3, 4, 2);
    let rows = num_relative_distance(wh, ww);
    let index = relative_position_index(wh, ww);
    let table = randn(rows * heads, 1.0, 28);
    let rb = randn(heads * index.len(), 1.0, 29);
    let dtable = scatter_bias_grad(&rb, heads, &index, rows);
    check("relpos table", &table, &dtable, |t| {
        dot(&gather_bias(t, heads, &index), &rb)
    });
}

#[test]
fn cross_entropy_with_label_smoothing_matches_torch() {
    let fx = |n: &str| {
        mood::npy::read_f32(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/train")
                .join(n),
        )
        .unwrap()
        .1
    };
    let (logits, labels, loss, grad) = (
        fx("ce_logits.npy"),
        fx("ce_labels.npy"),
        fx("ce_loss.npy"),
        fx("ce_grad.npy"),
    );
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let (ours, dz) = mood::train::loss::cross_entropy(&logits, &labels, 10, 0.1);
    assert!(
        (ours - loss[0]).abs() < 1e-5,
        "loss {ours} vs torch {}",
        loss[0]
    );
    for (a, b) in dz.iter().zip(&grad) {
        assert!((a - b).abs() < 1e-6, "grad {a} vs torch {b}");
    }
}

#[test]
fn mos_group_softmax_loss_matches_torch() {
    let fx = |n: &str| {
        mood::npy::read_f32(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/train")
                .join(n),
        )
        .unwrap()
    };
    let (_, logits) = fx("mos_logits.npy");
    let (lshape, labels) = fx("mos_labels.npy");
    let labels: Vec<Vec<usize>> = labels
        .chunks(lshape[1])
        .map(|r| r.iter().map(|&v| v as usize).collect())
        .collect();
    let (ours, dz) = mood::train::loss::group_softmax(&logits, &[3, 1, 4], &labels);
    let (_, loss) = fx("mos_loss.npy");
    let (_, grad) = fx("mos_grad.npy");
    assert!(
        (ours - loss[0]).abs() < 1e-5,
        "loss {ours} vs torch {}",
        loss[0]
    );
    for (a, b) in dz.iter().zip(&grad) {
        assert!((a - b).abs() < 1e-6, "grad {a} vs torch {b}");
    }
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use super::{check, dot, randn};
    use std::collections::HashMap;
    use std::sync::Arc;

    use mood::backend::cpu::{attention, layernorm, matmul, patch_embed, reduce};
    use mood::backend::cuda::CudaDevice;
    use mood::backend::{Activation, Pool};
    use mood::model::cuda_exec::CudaExec;
    use mood::model::exec::Exec;
    use mood::model::layers::{Linear, LinearBias, Norm, Param, RelBias};
    use mood::model::relpos;
    use mood::model::train_exec::TrainExec;
    use mood::train::tape::{Tape, Var};
    use mood::Tensor;

    type CudaTape = Tape<CudaExec<f32>>;

    fn param(name: &str, shape: &[usize], v: &[f32]) -> Param {
        Param {
            name: name.into(),
            value: Tensor::from_vec(shape, v.to_vec()).unwrap(),
        }
    }

    /// Records `op` over the input `x` on a CUDA tape, runs backward from its output with dy = r:
    /// (the input's gradient, the parameters' gradients), on the host.
    fn grads(
        dev: &Arc<CudaDevice>,
        x: (&[usize], &[f32]),
        r: &[f32],
        op: impl FnOnce(&mut CudaTape, Var) -> Var,
    ) -> (Vec<f32>, HashMap<String, Vec<f32>>) {
        let mut tape = Tape::on(CudaExec::<f32>::new(Arc::clone(dev), "gradcheck", 8));
        tape.want_input_grad = true;
        let xv = tape
            .input(&Tensor::from_vec(x.0, x.1.to_vec()).unwrap())
            .unwrap();
        let out = op(&mut tape, xv);
        let (g, mut ex) = tape.backward_keep(vec![(out, r.to_vec())]).unwrap();
        let dx = ex
            .grad_to_host(g.input.as_ref().expect("input gradient"))
            .unwrap();
        let params = g
            .params
            .iter()
            .map(|(k, v)| (k.clone(), ex.grad_to_host(v).unwrap()))
            .collect();
        (dx, params)
    }

    /// x·wᵀ + b, then GELU when `gelu` (f64 inside, as the references).
    fn linear_ref(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        gelu: bool,
    ) -> Vec<f32> {
        let mut y = matmul::linear_reference(x, w, m, k, n);
        for (i, v) in y.iter_mut().enumerate() {
            let z = *v as f64 + b[i % n] as f64;
            *v = if gelu {
                (0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2))) as f32
            } else {
                z as f32
            };
        }
        y
    }

    fn linear_cases(dev: &Arc<CudaDevice>) {
        let (m, k, n) = (7, 13, 5);
        let x = randn(m * k, 1.0, 1);
        let w = randn(n * k, 0.5, 2);
        let b = randn(n, 0.5, 30);
        let r = randn(m * n, 1.0, 3);
        // A GEMM outside the blocks (f32 weights) and one inside with GELU (the T path).
        for (prefix, act) in [
            ("head", Activation::None),
            ("blocks.0.mlp.fc1", Activation::Gelu),
        ] {
            let gelu = act == Activation::Gelu;
            let l = Linear {
                w: param(&format!("{prefix}.weight"), &[n, k], &w),
                bias: LinearBias::Full(param(&format!("{prefix}.bias"), &[n], &b)),
            };
            let (dx, p) = grads(dev, (&[m, k], &x), &r, |t, xv| {
                t.linear(&xv, &l, act).unwrap()
            });
            let dims = (m, k, n);
            check(&format!("cuda {prefix} dx"), &x, &dx, |x| {
                dot(&linear_ref(x, &w, &b, dims, gelu), &r)
            });
            check(&format!("cuda {prefix} dw"), &w, &p[&l.w.name], |w| {
                dot(&linear_ref(&x, w, &b, dims, gelu), &r)
            });
            check(
                &format!("cuda {prefix} db"),
                &b,
                &p[&format!("{prefix}.bias")],
                |b| dot(&linear_ref(&x, &w, b, dims, gelu), &r),
            );
        }
    }

    fn layernorm_case(dev: &Arc<CudaDevice>) {
        let (m, d) = (6, 24);
        let x = randn(m * d, 2.0, 4);
        let g = randn(d, 1.0, 5);
        let b = randn(d, 1.0, 6);
        let r = randn(m * d, 1.0, 7);
        let norm = Norm {
            w: param("norm.weight", &[d], &g),
            b: param("norm.bias", &[d], &b),
        };
        let (dx, p) = grads(dev, (&[m, d], &x), &r, |t, xv| {
            t.layernorm(&xv, &norm, 1e-6).unwrap()
        });
        check("cuda layernorm dx", &x, &dx, |x| {
            dot(&layernorm::reference(x, &g, &b, 1e-6), &r)
        });
        check("cuda layernorm dgamma", &g, &p["norm.weight"], |g| {
            dot(&layernorm::reference(&x, g, &b, 1e-6), &r)
        });
        check("cuda layernorm dbeta", &b, &p["norm.bias"], |b| {
            dot(&layernorm::reference(&x, &g, b, 1e-6), &r)
        });
    }

    /// Attention with BEiT's relative-position table (the dense bias gathered from it), and
    /// without: dqkv and the table's gradient.
    fn attention_cases(dev: &Arc<CudaDevice>) {
        // (B, Wh, Ww, H, Dh): N = Wh·Ww + 1 tokens.
        for &(b, wh, ww, h, dh) in &[(2, 2, 2, 2, 4), (1, 4, 4, 3, 8), (5, 1, 3, 2, 3)] {
            let n = wh * ww + 1;
            let dims = attention::Dims { b, n, h, dh };
            let d = h * dh;
            let qkv = randn(b * n * 3 * d, 0.7, 10);
            let index = relpos::relative_position_index(wh, ww);
            let rows = relpos::num_relative_distance(wh, ww);
            let table = randn(rows * h, 0.5, 11);
            let r = randn(b * n * d, 1.0, 12);
            let rel = RelBias {
                table: param(
                    "rel_pos_bias.relative_position_bias_table",
                    &[rows, h],
                    &table,
                ),
                dense: Tensor::from_vec(&[h, n, n], relpos::gather_bias(&table, h, &index))
                    .unwrap(),
                index: index.clone(),
            };
            let loss = |q: &[f32], t: &[f32]| {
                let bias = relpos::gather_bias(t, h, &index);
                dot(&attention::reference(q, Some(&bias), &dims), &r)
            };
            let (dqkv, p) = grads(dev, (&[b * n, 3 * d], &qkv), &r, |t, q| {
                t.attention(q, Some(&rel), b, n, h).unwrap()
            });
            let what = format!("cuda attention (B {b}, N {n}, H {h}, Dh {dh})");
            check(&format!("{what} dqkv"), &qkv, &dqkv, |q| loss(q, &table));
            check(
                &format!("{what} dtable"),
                &table,
                &p[&rel.table.name],
                |t| loss(&qkv, t),
            );
            let (dq2, p) = grads(dev, (&[b * n, 3 * d], &qkv), &r, |t, q| {
                t.attention(q, None, b, n, h).unwrap()
            });
            assert!(p.is_empty(), "attention without a bias has no parameters");
            check(&format!("{what} dqkv (no bias)"), &qkv, &dq2, |q| {
                dot(&attention::reference(q, None, &dims), &r)
            });
        }
    }

    /// Patch embedding: the weight, bias and image gradients (the last through col2im).
    fn patch_embed_case(dev: &Arc<CudaDevice>) {
        let (b, c, s, p, d) = (2, 3, 8, 4, 5);
        let k = c * p * p;
        let rows = b * (s / p) * (s / p);
        let x = randn(b * c * s * s, 1.0, 20);
        let w = randn(d * k, 0.3, 21);
        let bias = randn(d, 0.3, 22);
        let r = randn(rows * d, 1.0, 23);
        let (wp, bp) = (
            param("patch_embed.proj.weight", &[d, c, p, p], &w),
            param("patch_embed.proj.bias", &[d], &bias),
        );
        let fwd = |x: &[f32], w: &[f32], bb: &[f32]| {
            let cols = patch_embed::im2col(x, b, c, s, s, p);
            dot(&linear_ref(&cols, w, bb, (rows, k, d), false), &r)
        };
        let (dx, g) = grads(dev, (&[b, c, s, s], &x), &r, |t, xv| {
            t.patch_embed(&xv, &wp, &bp).unwrap()
        });
        check("cuda patch_embed dimages", &x, &dx, |x| fwd(x, &w, &bias));
        check("cuda patch_embed dw", &w, &g[&wp.name], |w| {
            fwd(&x, w, &bias)
        });
        check("cuda patch_embed db", &bias, &g[&bp.name], |bb| {
            fwd(&x, &w, bb)
        });
    }

    /// x + γ ⊙ y: the branch's and γ's gradients (the branch is the tape's input here).
    fn residual_case(dev: &Arc<CudaDevice>) {
        let (m, d) = (5, 12);
        let x = randn(m * d, 1.0, 22);
        let y = randn(m * d, 1.0, 23);
        let g = randn(d, 1.0, 24);
        let r = randn(m * d, 1.0, 25);
        let gamma = param("blocks.0.gamma_1", &[d], &g);
        let fwd = |y: &[f32], g: &[f32]| {
            let mut out = x.clone();
            mood::backend::cpu::elementwise::residual_scaled(&mut out, y, Some(g), d);
            dot(&out, &r)
        };
        let (dy, p) = grads(dev, (&[m, d], &y), &r, |t, yv| {
            let xv = t
                .input(&Tensor::from_vec(&[m, d], x.clone()).unwrap())
                .unwrap();
            t.residual(xv, yv, Some(&gamma), 0).unwrap()
        });
        check("cuda residual dy", &y, &dy, |y| fwd(y, &g));
        check("cuda residual dgamma", &g, &p[&gamma.name], |g| fwd(&y, g));
    }

    fn mean_pool_case(dev: &Arc<CudaDevice>) {
        let (b, n, d) = (2, 5, 3);
        let x = randn(b * n * d, 1.0, 26);
        let r = randn(b * d, 1.0, 27);
        let (dx, _) = grads(dev, (&[b * n, d], &x), &r, |t, xv| {
            t.pool(xv, b, Pool::MeanPatches).unwrap()
        });
        check("cuda mean pool", &x, &dx, |x| {
            dot(&reduce::mean_tokens(x, b, n, d, 1), &r)
        });
    }

    /// The tape's cross-entropy on the device against torch's loss and gradient (the fixture of
    /// `cross_entropy_with_label_smoothing_matches_torch`).
    fn cross_entropy_case(dev: &Arc<CudaDevice>) {
        let fx = |n: &str| {
            mood::npy::read_f32(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/train")
                    .join(n),
            )
            .unwrap()
            .1
        };
        let (logits, labels) = (fx("ce_logits.npy"), fx("ce_labels.npy"));
        let (loss, grad) = (fx("ce_loss.npy"), fx("ce_grad.npy"));
        let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        let mut tape = Tape::on(CudaExec::<f32>::new(Arc::clone(dev), "gradcheck", 8));
        let z = Tensor::from_vec(&[labels.len(), 10], logits).unwrap();
        let zv = tape.input(&z).unwrap();
        let (ours, dz) = tape.cross_entropy(&zv, &labels, 0.1).unwrap();
        let dz = tape.exec().grad_to_host(&dz).unwrap();
        assert!(
            (ours - loss[0]).abs() < 1e-5,
            "cuda loss {ours} vs torch {}",
            loss[0]
        );
        for (a, b) in dz.iter().zip(&grad) {
            assert!((a - b).abs() < 1e-6, "cuda grad {a} vs torch {b}");
        }
    }

    #[test]
    fn cuda_tape_backward_matches_finite_differences() {
        let Some(dev) =
            super::common::cuda::device("on_cuda::cuda_tape_backward_matches_finite_differences")
        else {
            return;
        };
        let dev = Arc::new(dev);
        linear_cases(&dev);
        layernorm_case(&dev);
        attention_cases(&dev);
        patch_embed_case(&dev);
        residual_case(&dev);
        mean_pool_case(&dev);
        cross_entropy_case(&dev);
        println!("the CUDA tape's gradients match finite differences");
    }
}
