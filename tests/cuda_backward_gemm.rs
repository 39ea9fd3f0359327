//! The GEMM-side backward launchers for training on the GPU against the CPU ops the training tape
//! uses (src/train/tape), from one table of cases as tests/cuda_parity.rs:
//!   - `matmul::linear_backward` (+ `_into` with accumulation)   vs cpu::matmul::linear_backward
//!   - `attention::forward_keep_probs` (f32, bf16) + `backward_batched` vs
//!     cpu::attention::{forward_keep_probs, backward}
//!   - `attention::RelposScatter` / `relpos_table_grad`          vs model::relpos::scatter_bias_grad
//!   - `relpos::RelposGather` (the forward's dense bias, re-derived after each training step)
//!     vs model::relpos::gather_bias
//!   - `patch_embed::col2im` and `patch_embed::backward`         vs cpu::patch_embed::{im2col, col2im}
//!     + cpu::matmul::linear_backward
//!
//! Error measure (tests/common parity_errors): rel = max_i |gpu_i − cpu_i| / (|cpu_i| + rms(cpu)),
//! the rms keeping near-zero entries from turning rounding noise into large ratios. Tolerances:
//! f32 1e-5 (the GEMMs sum in another order than the CPU's, nothing else differs). As in
//! tests/cuda_parity.rs, the bf16 cases round their inputs (x, w, qkv, and the gradients dy, dO
//! that the launchers round for their GEMMs) to bf16 on the host and the CPU runs on those values
//! in f32; then the bf16 linear and patch-embedding gradients (bf16 products are exact in f32,
//! accumulated in f32) and the attention dbias (f32 from bf16-exact operands) are held to 1e-5,
//! and what the GPU keeps in bf16 inside (P and dS as GEMM operands, the bf16 forward output) to
//! 2e-2, about 2^-9 relative per rounded operand. The `dy f32` / `dO f32` cases pass unrounded
//! gradients instead, so the launcher's own rounding of them shows too: 2e-2 on every output.
//! relpos, col2im and the bias gradients db (linear, patch embedding, also accumulated): exact
//! (0), they only move values or add them in the CPU's order (elementwise.cu's column sums).
//! Every reduction is fixed-order, and `backward_launchers_are_bitwise_deterministic` checks it by
//! running each launcher twice. Without a GPU all of this runs on the CPU stand-in
//! (tests/common/cuda.rs).
//!
//! `cargo test --release --test cuda_backward_gemm -- --nocapture` prints one line per output.

#![cfg(feature = "cuda")]

use cudarc::driver::CudaSlice;
use half::bf16;
use mood::backend::cpu;
use mood::backend::cuda::{self as cu, CudaDevice, Storage};
use mood::model::init::Rng;
use mood::model::relpos;
use mood::Result;

mod common;
use common::parity_errors as errors;

const F32_TOL: f32 = 1e-5;
const HALF_TOL: f32 = 2e-2;

/// One output: name, GPU values, CPU reference, tolerance on the rel error.
struct Out(&'static str, Vec<f32>, Vec<f32>, f32);

type Run = Box<dyn Fn(&CudaDevice, &mut Rng) -> Result<Vec<Out>>>;

/// (op, shape, dtype, run).
struct Case(&'static str, String, &'static str, Run);

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * std).collect()
}

fn rounded<T: Storage>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn up<T: Storage>(dev: &CudaDevice, v: &[f32]) -> Result<CudaSlice<T>> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    dev.upload(&host)
}

fn tol<T: Storage>() -> f32 {
    if T::NAME == "f32" {
        F32_TOL
    } else {
        HALF_TOL
    }
}

/// The tolerance of an output the GPU computes from bf16-exact operands with f32 accumulation:
/// f32's, unless the gradient it starts from was left unrounded (`exact` false) for the launcher
/// to round.
fn tol_exact<T: Storage>(exact: bool) -> f32 {
    if exact {
        F32_TOL
    } else {
        tol::<T>()
    }
}

/// `round_grad`: dy rounded to T on the host (bf16: the launcher's own cast is then exact).
fn linear_backward<T: Storage>(
    (m, k, n): (usize, usize, usize),
    want_db: bool,
    round_grad: bool,
) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x = rounded::<T>(&randn(rng, m * k, 1.0));
        let w = rounded::<T>(&randn(rng, n * k, 0.5));
        let dy = randn(rng, m * n, 1.0);
        let dy = if round_grad { rounded::<T>(&dy) } else { dy };
        let t = tol_exact::<T>(round_grad);
        let (dx_want, dw_want, db_want) = cpu::matmul::linear_backward(&x, &w, &dy, m, k, n);
        let (xd, wd, dyd) = (up::<T>(dev, &x)?, up::<T>(dev, &w)?, dev.upload(&dy)?);
        let (dx, dw, db) = cu::matmul::linear_backward(dev, &xd, &wd, &dyd, want_db, (m, k, n))?;
        let mut outs = vec![
            Out("dx", dev.download(&dx)?, dx_want, t),
            Out("dw", dev.download(&dw)?, dw_want.clone(), t),
        ];
        match db {
            Some(db) => outs.push(Out("db", dev.download(&db)?, db_want, 0.0)),
            None if want_db => outs.push(Out("db", Vec::new(), db_want, 0.0)),
            None => {}
        }
        // Accumulation: dw0 + dyᵀ·x into an existing buffer (beta = 1), db likewise; no dx.
        let dw0 = randn(rng, n * k, 1.0);
        let db0 = randn(rng, n, 1.0);
        let (mut dwd, mut dbd) = (dev.upload(&dw0)?, dev.upload(&db0)?);
        cu::matmul::linear_backward_into(
            dev,
            &xd,
            &wd,
            &dyd,
            None,
            &mut dwd,
            Some(&mut dbd),
            true,
            (m, k, n),
        )?;
        let db_sum = cpu::reduce::column_sums(&dy, n);
        let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<_>>();
        outs.push(Out("dw+=", dev.download(&dwd)?, add(&dw0, &dw_want), t));
        outs.push(Out("db+=", dev.download(&dbd)?, add(&db0, &db_sum), 0.0));
        Ok(outs)
    });
    Case(
        "linear_backward",
        format!(
            "M={m} K={k} N={n}{}{}",
            if want_db { " +db" } else { "" },
            if round_grad { "" } else { " dy f32" }
        ),
        T::NAME,
        run,
    )
}

/// The attention forward keeping P, then its backward, both against the CPU's.
/// `round_grad`: dO rounded to T on the host, as `linear_backward`'s dy.
fn attention_backward<T: Storage>(
    (b, n, h, dh): (usize, usize, usize, usize),
    bias: bool,
    round_grad: bool,
) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let d = h * dh;
        let qkv = rounded::<T>(&randn(rng, b * n * 3 * d, 1.0));
        let rel = randn(rng, h * n * n, 0.5);
        let dout = randn(rng, b * n * d, 1.0);
        let dout = if round_grad {
            rounded::<T>(&dout)
        } else {
            dout
        };
        let dims = cpu::attention::Dims { b, n, h, dh };
        let mut out_want = vec![0.0; b * n * d];
        let bias_h = bias.then_some(&rel[..]);
        let p_want = cpu::attention::forward_keep_probs(&qkv, bias_h, &dims, &mut out_want);
        let (dqkv_want, dbias_want) = cpu::attention::backward(&qkv, &p_want, bias, &dims, &dout);

        let gd = cu::attention::Dims { b, n, h, dh };
        let scale = (dh as f32).powf(-0.5);
        let rd = dev.upload(&rel)?;
        let bias_d = bias.then_some(&rd);
        let qd = up::<T>(dev, &qkv)?;
        let (out, probs, kept) = if T::NAME == "f32" {
            let qd = dev.upload(&qkv)?;
            let mut o = dev.zeros::<f32>(b * n * d)?;
            let mut ws = cu::attention::BatchedScratch::new(dev, &gd)?;
            let p =
                cu::attention::forward_keep_probs(dev, &qd, bias_d, &mut o, &gd, scale, &mut ws)?;
            let mut kept = dev.zeros::<f32>(b * h * n * n)?;
            cu::attention::forward_keep_probs_into(
                dev, &qd, bias_d, &mut o, &gd, scale, &mut ws, &mut kept,
            )?;
            (dev.download(&o)?, p, kept)
        } else {
            let qd = up::<bf16>(dev, &qkv)?;
            let mut o = dev.zeros::<bf16>(b * n * d)?;
            let mut ws = cu::attention::BatchedScratch::new(dev, &gd)?;
            let p =
                cu::attention::forward_keep_probs(dev, &qd, bias_d, &mut o, &gd, scale, &mut ws)?;
            let mut kept = dev.zeros::<f32>(b * h * n * n)?;
            cu::attention::forward_keep_probs_into(
                dev, &qd, bias_d, &mut o, &gd, scale, &mut ws, &mut kept,
            )?;
            let o = dev.download(&o)?.into_iter().map(bf16::to_f32).collect();
            (o, p, kept)
        };
        let dd = dev.upload(&dout)?;
        let (dqkv, dbias) =
            cu::attention::backward_batched(dev, &qd, &probs, &dd, bias, &gd, scale)?;
        let (p_got, dqkv_got) = (dev.download(&probs)?, dev.download(&dqkv)?);
        let dbias_got = dbias.as_ref().map(|g| dev.download(g)).transpose()?;
        // The kept-scratch forms give the one-off calls' bits: P written into a caller's buffer,
        // and the backward with one BackwardScratch used twice.
        let mut ws_b = cu::attention::BackwardScratch::<T>::new(dev, &gd)?;
        let mut again = (Vec::new(), None);
        for _ in 0..2 {
            let (g, db) = cu::attention::backward_batched_with(
                dev, &qd, &probs, &dd, bias, &gd, scale, &mut ws_b,
            )?;
            again = (dev.download(&g)?, db.map(|x| dev.download(&x)).transpose()?);
        }
        let mut outs = vec![
            Out("out", out, out_want, tol::<T>()),
            // P comes from f32 scores on both sides (bf16 only rounds qkv, which the CPU sees).
            Out("probs", p_got.clone(), p_want, F32_TOL),
            Out("probs into", dev.download(&kept)?, p_got, 0.0),
            Out("dqkv", dqkv_got.clone(), dqkv_want, tol::<T>()),
            Out("dqkv scratch", again.0, dqkv_got, 0.0),
        ];
        if let (Some(a), Some(g)) = (again.1, dbias_got) {
            outs.push(Out("dbias scratch", a, g, 0.0));
        }
        match (dbias, dbias_want) {
            (Some(g), Some(w)) => {
                let t = tol_exact::<T>(round_grad);
                outs.push(Out("dbias", dev.download(&g)?, w, t))
            }
            (None, None) => {}
            (_, w) => outs.push(Out("dbias", Vec::new(), w.unwrap_or_default(), 0.0)),
        }
        Ok(outs)
    });
    Case(
        "attention_bwd",
        format!(
            "B={b} N={n} H={h} Dh={dh}{}{}",
            if bias { " +bias" } else { "" },
            if round_grad { "" } else { " dO f32" }
        ),
        T::NAME,
        run,
    )
}

/// BEiT's table gradient for a wh × wh patch grid (N = wh² + 1 tokens with the cls token).
fn relpos_grad(wh: usize, h: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let n = wh * wh + 1;
        let index = relpos::relative_position_index(wh, wh);
        let rows = relpos::num_relative_distance(wh, wh);
        let dbias = randn(rng, h * n * n, 1.0);
        let want = relpos::scatter_bias_grad(&dbias, h, &index, rows);
        let dd = dev.upload(&dbias)?;
        let scatter = cu::attention::RelposScatter::new(dev, &index, rows, n)?;
        let got = dev.download(&scatter.grad(dev, &dd, h)?)?;
        let once = dev.download(&cu::attention::relpos_table_grad(
            dev, &dd, &index, rows, h,
        )?)?;
        Ok(vec![
            Out("dtable", got, want.clone(), 0.0),
            Out("one-off", once, want, 0.0),
        ])
    });
    Case("relpos_grad", format!("grid {wh}x{wh} H={h}"), "f32", run)
}

/// BEiT's dense bias [H, N, N] gathered from a random table for a wh × ww patch grid.
fn relpos_gather(wh: usize, ww: usize, h: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let index = relpos::relative_position_index(wh, ww);
        let rows = relpos::num_relative_distance(wh, ww);
        let table = randn(rng, rows * h, 1.0);
        let want = relpos::gather_bias(&table, h, &index);
        let gather = cu::relpos::RelposGather::new(dev, &index, rows)?;
        let got = dev.download(&gather.gather(dev, &dev.upload(&table)?, h)?)?;
        Ok(vec![Out("dense", got, want, 0.0)])
    });
    Case("relpos_gather", format!("grid {wh}x{ww} H={h}"), "f32", run)
}

fn col2im(b: usize, c: usize, hw: usize, p: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let g = (hw / p) * (hw / p);
        let cols = randn(rng, b * g * c * p * p, 1.0);
        let want = cpu::patch_embed::col2im(&cols, b, c, hw, hw, p);
        let dims = cu::patch_embed::Dims {
            b,
            c,
            h: hw,
            w: hw,
            p,
        };
        let got = cu::patch_embed::col2im(dev, &dev.upload(&cols)?, dims)?;
        Ok(vec![Out("images", dev.download(&got)?, want, 0.0)])
    });
    Case("col2im", format!("B={b} C={c} {hw}x{hw} P={p}"), "f32", run)
}

fn patch_embed_backward<T: Storage>(b: usize, c: usize, hw: usize, p: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let g = (hw / p) * (hw / p);
        let k = c * p * p;
        let images = rounded::<T>(&randn(rng, b * c * hw * hw, 1.0));
        let w = rounded::<T>(&randn(rng, d * k, 0.2));
        let dy = rounded::<T>(&randn(rng, b * g * d, 1.0));
        let cols = cpu::patch_embed::im2col(&images, b, c, hw, hw, p);
        let (dcols, dw_want, db_want) = cpu::matmul::linear_backward(&cols, &w, &dy, b * g, k, d);
        let dimg_want = cpu::patch_embed::col2im(&dcols, b, c, hw, hw, p);
        let dims = cu::patch_embed::Dims {
            b,
            c,
            h: hw,
            w: hw,
            p,
        };
        let (dw, db, dimg) = cu::patch_embed::backward(
            dev,
            &dev.upload(&images)?,
            &up::<T>(dev, &w)?,
            &dev.upload(&dy)?,
            dims,
            d,
            true,
        )?;
        let dimg = match dimg {
            Some(x) => dev.download(&x)?,
            None => Vec::new(),
        };
        // dy is rounded like the inputs: the GEMMs see bf16-exact operands (see the module doc).
        Ok(vec![
            Out("dweight", dev.download(&dw)?, dw_want, F32_TOL),
            Out("dbias", dev.download(&db)?, db_want, 0.0),
            Out("dimages", dimg, dimg_want, F32_TOL),
        ])
    });
    Case(
        "patch_embed_bwd",
        format!("B={b} C={c} {hw}x{hw} P={p} D={d}"),
        T::NAME,
        run,
    )
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        linear_backward::<f32>((1, 1, 1), true, true),
        linear_backward::<f32>((7, 5, 3), true, true),
        linear_backward::<f32>((300, 96, 33), false, true),
        linear_backward::<f32>((394, 192, 576), true, true),
        linear_backward::<f32>((600, 64, 40), true, true),
        linear_backward::<bf16>((7, 5, 3), true, true),
        linear_backward::<bf16>((394, 192, 576), true, true),
        linear_backward::<bf16>((600, 64, 40), false, true),
        linear_backward::<bf16>((394, 192, 576), true, false),
    ];
    for n in [5, 17, 197] {
        for b in [1, 3] {
            for bias in [false, true] {
                v.push(attention_backward::<f32>((b, n, 2, 32), bias, true));
                v.push(attention_backward::<bf16>((b, n, 2, 32), bias, true));
            }
        }
    }
    // BEiT's head dim with more heads; then the launcher's own rounding of an f32 dO.
    v.push(attention_backward::<f32>((2, 65, 4, 64), true, true));
    v.push(attention_backward::<bf16>((2, 65, 4, 64), true, true));
    v.push(attention_backward::<bf16>((2, 17, 2, 32), true, false));
    // More than one group of 4 images: dbias adds the groups' partials as the CPU.
    v.push(attention_backward::<f32>((9, 17, 2, 32), true, true));
    for (wh, h) in [(2, 3), (4, 2), (14, 12)] {
        v.push(relpos_grad(wh, h));
        v.push(relpos_gather(wh, wh, h));
    }
    v.push(relpos_gather(3, 5, 2)); // a non-square grid
    v.push(col2im(2, 3, 16, 4));
    v.push(col2im(3, 2, 17, 4)); // a partial last row/column of pixels: zero gradient there
    v.push(patch_embed_backward::<f32>(2, 3, 16, 4, 24));
    v.push(patch_embed_backward::<f32>(1, 3, 18, 4, 8));
    v.push(patch_embed_backward::<bf16>(2, 3, 16, 4, 24));
    v
}

#[test]
fn backward_launchers_match_the_cpu() {
    let Some(dev) = common::cuda::device("backward_launchers_match_the_cpu") else {
        return;
    };
    let mut failures = Vec::new();
    for (i, Case(op, shape, dtype, run)) in cases().into_iter().enumerate() {
        let mut rng = Rng::new(2000 + i as u64);
        let label = format!("{op:<16} {dtype:<5} {shape:<28}");
        match run(&dev, &mut rng) {
            Err(e) => {
                println!("ERROR {label} {e}");
                failures.push(format!("{label}: {e}"));
            }
            Ok(outs) => {
                for Out(name, got, want, tol) in outs {
                    let (abs, rel) = if got.len() == want.len() {
                        errors(&got, &want)
                    } else {
                        (f32::INFINITY, f32::INFINITY)
                    };
                    let ok = rel <= tol;
                    println!(
                        "{} {label} {name:<8} max_abs {abs:.3e} max_rel {rel:.3e} tol {tol:.1e}",
                        if ok { "PASS " } else { "FAIL " }
                    );
                    if !ok {
                        failures.push(format!(
                            "{label} {name}: rel {rel:.3e} > {tol:.1e} ({} values, want {})",
                            got.len(),
                            want.len()
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// Runs `f` twice and demands the same bits from both runs.
fn twice(what: &str, f: impl Fn() -> Result<Vec<Vec<f32>>>) -> Option<String> {
    let (a, b) = match (f(), f()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Some(format!("{what}: {e}")),
    };
    let bits = |v: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        v.iter()
            .map(|x| x.iter().map(|f| f.to_bits()).collect())
            .collect()
    };
    let same = bits(&a) == bits(&b);
    println!(
        "{} {what}: {} outputs",
        if same { "SAME " } else { "DIFF " },
        a.len()
    );
    (!same).then(|| format!("{what}: two runs differ"))
}

fn attention_twice<T: Storage>(
    dev: &CudaDevice,
    rng: &mut Rng,
    (b, n, h, dh): (usize, usize, usize, usize),
) -> Option<String> {
    let d = h * dh;
    let qkv = randn(rng, b * n * 3 * d, 1.0);
    let rel = randn(rng, h * n * n, 0.5);
    let dout = randn(rng, b * n * d, 1.0);
    let gd = cu::attention::Dims { b, n, h, dh };
    let run = || -> Result<Vec<Vec<f32>>> {
        let rd = dev.upload(&rel)?;
        let qd = up::<T>(dev, &qkv)?;
        let scale = (dh as f32).powf(-0.5);
        let probs = if T::NAME == "f32" {
            let qd = dev.upload(&qkv)?;
            let mut o = dev.zeros::<f32>(b * n * d)?;
            let mut ws = cu::attention::BatchedScratch::new(dev, &gd)?;
            cu::attention::forward_keep_probs(dev, &qd, Some(&rd), &mut o, &gd, scale, &mut ws)?
        } else {
            let qd = up::<bf16>(dev, &qkv)?;
            let mut o = dev.zeros::<bf16>(b * n * d)?;
            let mut ws = cu::attention::BatchedScratch::new(dev, &gd)?;
            cu::attention::forward_keep_probs(dev, &qd, Some(&rd), &mut o, &gd, scale, &mut ws)?
        };
        let dd = dev.upload(&dout)?;
        let (dqkv, dbias) =
            cu::attention::backward_batched(dev, &qd, &probs, &dd, true, &gd, scale)?;
        let dbias = dbias.expect("asked for dbias");
        Ok(vec![
            dev.download(&probs)?,
            dev.download(&dqkv)?,
            dev.download(&dbias)?,
        ])
    };
    twice(
        &format!("attention_bwd {} B={b} N={n} H={h} Dh={dh}", T::NAME),
        run,
    )
}

fn linear_twice<T: Storage>(
    dev: &CudaDevice,
    rng: &mut Rng,
    (m, k, n): (usize, usize, usize),
) -> Option<String> {
    let x = randn(rng, m * k, 1.0);
    let w = randn(rng, n * k, 1.0);
    let dy = randn(rng, m * n, 1.0);
    let run = || -> Result<Vec<Vec<f32>>> {
        let (xd, wd, dyd) = (up::<T>(dev, &x)?, up::<T>(dev, &w)?, dev.upload(&dy)?);
        let (dx, dw, db) = cu::matmul::linear_backward(dev, &xd, &wd, &dyd, true, (m, k, n))?;
        Ok(vec![
            dev.download(&dx)?,
            dev.download(&dw)?,
            dev.download(&db.expect("asked for db"))?,
        ])
    };
    twice(
        &format!("linear_backward {} M={m} K={k} N={n}", T::NAME),
        run,
    )
}

#[test]
fn backward_launchers_are_bitwise_deterministic() {
    let Some(dev) = common::cuda::device("backward_launchers_are_bitwise_deterministic") else {
        return;
    };
    let mut rng = Rng::new(77);
    let mut failures = Vec::new();
    failures.extend(linear_twice::<f32>(&dev, &mut rng, (1000, 96, 48)));
    failures.extend(linear_twice::<bf16>(&dev, &mut rng, (1000, 96, 48)));
    failures.extend(attention_twice::<f32>(&dev, &mut rng, (3, 197, 2, 32)));
    failures.extend(attention_twice::<bf16>(&dev, &mut rng, (3, 197, 2, 32)));
    let (wh, h) = (14, 4);
    let n = wh * wh + 1;
    let index = relpos::relative_position_index(wh, wh);
    let rows = relpos::num_relative_distance(wh, wh);
    let dbias = randn(&mut rng, h * n * n, 1.0);
    failures.extend(twice("relpos_grad", || {
        let g = cu::attention::relpos_table_grad(&dev, &dev.upload(&dbias)?, &index, rows, h)?;
        Ok(vec![dev.download(&g)?])
    }));
    let dims = cu::patch_embed::Dims {
        b: 2,
        c: 3,
        h: 16,
        w: 16,
        p: 4,
    };
    let images = randn(&mut rng, 2 * 3 * 16 * 16, 1.0);
    let w = randn(&mut rng, 24 * 48, 0.2);
    let dy = randn(&mut rng, 2 * 16 * 24, 1.0);
    failures.extend(twice("patch_embed_bwd f32", || {
        let (dw, db, di) = cu::patch_embed::backward(
            &dev,
            &dev.upload(&images)?,
            &dev.upload(&w)?,
            &dev.upload(&dy)?,
            dims,
            24,
            true,
        )?;
        Ok(vec![
            dev.download(&dw)?,
            dev.download(&db)?,
            dev.download(&di.expect("asked for dimages"))?,
        ])
    }));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Wrong buffer lengths and indices are errors naming the buffer, never panics.
#[test]
fn backward_launchers_refuse_bad_shapes() {
    let Some(dev) = common::cuda::device("backward_launchers_refuse_bad_shapes") else {
        return;
    };
    let expect_err = |what: &str, r: Result<()>, needle: &str| {
        let e = r.expect_err(what).to_string();
        println!("{what}: {e}");
        assert!(e.contains(needle), "{what}: `{e}` does not name `{needle}`");
    };
    let z = |n: usize| dev.zeros::<f32>(n).unwrap();
    expect_err(
        "linear dy",
        cu::matmul::linear_backward(&dev, &z(6), &z(9), &z(5), true, (2, 3, 3)).map(|_| ()),
        "dy",
    );
    expect_err(
        "linear weight",
        cu::matmul::linear_backward(&dev, &z(6), &z(8), &z(6), true, (2, 3, 3)).map(|_| ()),
        "weight",
    );
    let mut dw = z(8);
    expect_err(
        "linear dw",
        cu::matmul::linear_backward_into(
            &dev,
            &z(6),
            &z(9),
            &z(6),
            None,
            &mut dw,
            None,
            false,
            (2, 3, 3),
        ),
        "dw",
    );
    expect_err(
        "linear empty",
        cu::matmul::linear_backward(&dev, &z(1), &z(3), &z(1), true, (0, 3, 3)).map(|_| ()),
        "empty shape",
    );
    let gd = cu::attention::Dims {
        b: 2,
        n: 5,
        h: 2,
        dh: 4,
    };
    let empty = cu::attention::Dims { b: 0, ..gd };
    expect_err(
        "attention empty",
        cu::attention::backward_batched(&dev, &z(1), &z(1), &z(1), true, &empty, 0.5).map(|_| ()),
        "qkv",
    );
    let (qkv, probs, dout) = (z(2 * 5 * 24), z(2 * 2 * 25), z(2 * 5 * 8));
    expect_err(
        "attention probs",
        cu::attention::backward_batched(&dev, &qkv, &z(99), &dout, true, &gd, 0.5).map(|_| ()),
        "probs",
    );
    expect_err(
        "attention dout",
        cu::attention::backward_batched(&dev, &qkv, &probs, &z(79), true, &gd, 0.5).map(|_| ()),
        "dout",
    );
    let index = relpos::relative_position_index(2, 2);
    let rows = relpos::num_relative_distance(2, 2);
    let mut bad = index.clone();
    bad[3] = rows;
    expect_err(
        "relpos index",
        cu::attention::RelposScatter::new(&dev, &bad, rows, 5).map(|_| ()),
        "index[3]",
    );
    expect_err(
        "relpos index length",
        cu::attention::RelposScatter::new(&dev, &index, rows, 6).map(|_| ()),
        "index",
    );
    let scatter = cu::attention::RelposScatter::new(&dev, &index, rows, 5).unwrap();
    expect_err(
        "relpos dbias",
        scatter.grad(&dev, &z(3 * 25 + 1), 3).map(|_| ()),
        "dbias",
    );
    expect_err(
        "relpos gather index",
        cu::relpos::RelposGather::new(&dev, &bad, rows).map(|_| ()),
        "index[3]",
    );
    let gather = cu::relpos::RelposGather::new(&dev, &index, rows).unwrap();
    expect_err(
        "relpos gather table",
        gather.gather(&dev, &z(rows * 3 - 1), 3).map(|_| ()),
        "table",
    );
    let dims = cu::patch_embed::Dims {
        b: 1,
        c: 3,
        h: 8,
        w: 8,
        p: 4,
    };
    expect_err(
        "col2im cols",
        cu::patch_embed::col2im(&dev, &z(4 * 48 - 1), dims).map(|_| ()),
        "cols",
    );
    expect_err(
        "col2im empty",
        cu::patch_embed::col2im(&dev, &z(1), cu::patch_embed::Dims { b: 0, ..dims }).map(|_| ()),
        "cols",
    );
    expect_err(
        "col2im patch 0",
        cu::patch_embed::col2im(&dev, &z(1), cu::patch_embed::Dims { p: 0, ..dims }).map(|_| ()),
        "patch size",
    );
    expect_err(
        "patch embed dy",
        cu::patch_embed::backward(&dev, &z(192), &z(8 * 48), &z(4 * 8 - 1), dims, 8, true)
            .map(|_| ()),
        "dy",
    );
}
