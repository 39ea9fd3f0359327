//! Every CUDA op against its CPU op on random inputs, from ONE table of cases (op, shape, dtype,
//! tolerance), in the style of ggml's test-backend-ops. Each case prints one line per output with
//! the max abs and max rel error; the test fails at the end if any case failed or errored, so one
//! bad kernel does not hide the others (a kernel fault, though, poisons the context for the rest).
//!
//! Error measure: rel_i = |gpu_i − cpu_i| / (|cpu_i| + rms(cpu)). The rms term keeps outputs that
//! happen to be near zero (a GEMM entry, a GELU of a negative) from turning rounding noise into a
//! huge relative error. Tolerances:
//!   - f32: 1e-5, except 3e-5 where the GPU sums K ≥ 768 products in another order than the CPU
//!     (GEMMs, the [D]-sums of dγ/dβ over M rows, the ‖q‖² − 2q·t + ‖t‖² distance identity).
//!   - bf16/f16 storage: 2e-2. Inputs are rounded to the storage type on the host and the CPU op
//!     runs on the rounded values in f32, so what is left is the output rounding (2^-8 for bf16)
//!     and the intermediates the GPU keeps in bf16 (a GEMM output before its bias/GELU).
//!   - casts, im2col, row selection, k-th smallest and top-k: exact (0).
//!   - the OOD GPU scorer against the CPU detector: 1e-4 (f32 GEMM expansion against the CPU's
//!     f64-refined nearest means; src/ood/cuda_score.rs states the bound).
//!
//! Without a usable GPU the same cases run on the CPU stand-in for CUDA (tools/cuda-sim, see
//! tests/common/cuda.rs) at the same tolerances. MOOD_PARITY_FILTER=substr, or a test-name filter
//! after `--` (`cargo test --release --test cuda_parity -- attention`), runs only the ops whose
//! name contains it.

#![cfg(feature = "cuda")]

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use mood::backend::cuda::{self as cu, CudaDevice, Storage};
use mood::backend::{self, cpu, Activation};
use mood::model::init::Rng;
use mood::{Result, Tensor};

mod common;
use common::parity_errors as errors;

// The distance-score cases (GEMM epilogues, k-th smallest, top-k), kept apart for length.
#[path = "cuda_parity/distance.rs"]
mod distance;
use distance::{kth, mahalanobis, scorer, sqdist, topk};

// The tensor-core cases: the fragment-layout check, then attention on tensor cores.
#[path = "cuda_parity/tensor_core.rs"]
mod tensor_core;
use tensor_core::tensor_core_mma;
#[path = "cuda_parity/flash_attention.rs"]
mod flash_attention;
// The cuBLAS attention over images × heads in one strided batch.
#[path = "cuda_parity/attention_batched.rs"]
mod attention_batched;
use attention_batched::attention_batched;
// The fused pre-norm kernels (residual, layer scale, LayerNorm, casts in fewer passes).
#[path = "cuda_parity/fused.rs"]
mod fused;
use fused::{layernorm_from_f32, residual_layernorm};
// The convolutional nets' kernels (ResNet, BiT): convolution, pooling, GroupNorm on NHWC maps.
#[path = "cuda_parity/conv.rs"]
mod conv;
// The ResNet training kernels: BatchNorm (train), the pooling/ReLU/convolution backward, SGD.
#[path = "cuda_parity/conv_grad.rs"]
mod conv_grad;

/// One output of a case: its name, the GPU values and the CPU reference (both as f32).
struct Out(&'static str, Vec<f32>, Vec<f32>);

type Run = Box<dyn Fn(&CudaDevice, &mut Rng) -> Result<Vec<Out>>>;

/// (op name, shape, dtype, tolerance on the rel error, the run returning its outputs).
struct Case(&'static str, String, &'static str, f32, Run);

const F32_TOL: f32 = 1e-5;
/// f32 results whose long sums run in a different order on the two sides (see the module doc).
const F32_SUM_TOL: f32 = 3e-5;
const HALF_TOL: f32 = 2e-2;

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * std).collect()
}

/// The values the device will see once stored as T.
fn rounded<T: Storage>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn up<T: Storage>(dev: &CudaDevice, v: &[f32]) -> Result<CudaSlice<T>> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    dev.upload(&host)
}

fn down<T: Storage>(dev: &CudaDevice, s: &CudaSlice<T>) -> Result<Vec<f32>> {
    Ok(dev.download(s)?.into_iter().map(T::to_f32).collect())
}

fn tol_for<T: Storage>(f32_tol: f32) -> f32 {
    [HALF_TOL, f32_tol][(T::NAME == "f32") as usize]
}

fn layernorm_fwd<T: Storage>(m: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        // A large mean offset: the two-pass variance must not cancel.
        let x: Vec<f32> = randn(rng, m * d, 1.0).iter().map(|v| v + 3.0).collect();
        let x = rounded::<T>(&x);
        let (g, b) = (randn(rng, d, 1.0), randn(rng, d, 1.0));
        let mut want = vec![0.0; m * d];
        cpu::layernorm::forward(&x, &g, &b, 1e-6, &mut want);
        let xd = up::<T>(dev, &x)?;
        let mut y = dev.zeros::<T>(m * d)?;
        let (gd, bd) = (dev.upload(&g)?, dev.upload(&b)?);
        cu::layernorm::forward(dev, &xd, &gd, &bd, &mut y, None, (m, d), 1e-6)?;
        Ok(vec![Out("y", down(dev, &y)?, want)])
    });
    Case(
        "layernorm_fwd",
        format!("[{m}, {d}]"),
        T::NAME,
        tol_for::<T>(F32_TOL),
        run,
    )
}

fn layernorm_bwd(m: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x = randn(rng, m * d, 2.0);
        let (g, b, dy) = (
            randn(rng, d, 1.0),
            randn(rng, d, 1.0),
            randn(rng, m * d, 1.0),
        );
        let (dx_want, dg_want, db_want) = cpu::layernorm::backward(&x, &g, 1e-6, &dy);
        let (xd, gd, bd, dyd) = (
            dev.upload(&x)?,
            dev.upload(&g)?,
            dev.upload(&b)?,
            dev.upload(&dy)?,
        );
        let mut y = dev.zeros::<f32>(m * d)?;
        let (mut mu, mut rs) = (dev.zeros::<f32>(m)?, dev.zeros::<f32>(m)?);
        let stats = Some((&mut mu, &mut rs));
        cu::layernorm::forward(dev, &xd, &gd, &bd, &mut y, stats, (m, d), 1e-6)?;
        let mut dx = dev.zeros::<f32>(m * d)?;
        let (dg, db) = cu::layernorm::backward(dev, &xd, &gd, &mu, &rs, &dyd, &mut dx, (m, d))?;
        Ok(vec![
            Out("dx", dev.download(&dx)?, dx_want),
            Out("dgamma", dev.download(&dg)?, dg_want),
            Out("dbeta", dev.download(&db)?, db_want),
        ])
    });
    Case(
        "layernorm_bwd",
        format!("[{m}, {d}]"),
        "f32",
        F32_SUM_TOL,
        run,
    )
}

fn bias_act<T: Storage>(m: usize, d: usize, gelu: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let y = rounded::<T>(&randn(rng, m * d, 2.0));
        let b = randn(rng, d, 1.0);
        let mut want = y.clone();
        if gelu {
            cpu::vecmath::bias_gelu_rows(&mut want, &b);
        } else {
            cpu::vecmath::bias_rows(&mut want, &b);
        }
        let mut yd = up::<T>(dev, &y)?;
        let bd = dev.upload(&b)?;
        if gelu {
            cu::elementwise::bias_gelu(dev, &mut yd, Some(&bd), (m, d))?;
        } else {
            cu::elementwise::bias_add(dev, &mut yd, &bd, (m, d))?;
        }
        Ok(vec![Out("y", down(dev, &yd)?, want)])
    });
    let op = if gelu { "bias_gelu" } else { "bias_add" };
    Case(
        op,
        format!("[{m}, {d}]"),
        T::NAME,
        tol_for::<T>(F32_TOL),
        run,
    )
}

fn gelu_bwd<T: Storage>(n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (x, dy) = (
            rounded::<T>(&randn(rng, n, 2.0)),
            rounded::<T>(&randn(rng, n, 1.0)),
        );
        let mut want = vec![0.0; n];
        cpu::vecmath::gelu_backward(&x, &dy, &mut want);
        let (xd, dyd) = (up::<T>(dev, &x)?, up::<T>(dev, &dy)?);
        let mut dx = dev.zeros::<T>(n)?;
        cu::elementwise::gelu_backward(dev, &xd, &dyd, &mut dx)?;
        Ok(vec![Out("dx", down(dev, &dx)?, want)])
    });
    Case(
        "gelu_bwd",
        format!("[{n}]"),
        T::NAME,
        tol_for::<T>(F32_TOL),
        run,
    )
}

fn residual<T: Storage>(m: usize, d: usize, gamma: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (x, y) = (
            randn(rng, m * d, 1.0),
            rounded::<T>(&randn(rng, m * d, 1.0)),
        );
        let g = randn(rng, d, 0.1);
        let mut want = x.clone();
        cpu::elementwise::residual_scaled(&mut want, &y, gamma.then_some(&g[..]), d);
        let mut xd = dev.upload(&x)?;
        let (yd, gd) = (up::<T>(dev, &y)?, dev.upload(&g)?);
        cu::elementwise::residual(dev, &mut xd, &yd, gamma.then_some(&gd), (m, d))?;
        // x stays f32 whatever y is: f32 tolerance for every storage type.
        Ok(vec![Out("x", dev.download(&xd)?, want)])
    });
    let op = if gamma { "residual_gamma" } else { "residual" };
    Case(op, format!("[{m}, {d}]"), T::NAME, F32_TOL, run)
}

fn assemble(b: usize, g: usize, d: usize, pos: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (p, c, ps) = (
            randn(rng, b * g * d, 1.0),
            randn(rng, d, 1.0),
            randn(rng, (g + 1) * d, 1.0),
        );
        let want = cpu::elementwise::assemble_tokens(&p, &c, pos.then_some(&ps[..]), b, g, d);
        let (pd, cd, psd) = (dev.upload(&p)?, dev.upload(&c)?, dev.upload(&ps)?);
        let mut x = dev.zeros::<f32>(b * (g + 1) * d)?;
        cu::elementwise::assemble_tokens(dev, &pd, &cd, pos.then_some(&psd), &mut x, (b, g, d))?;
        Ok(vec![Out("x", dev.download(&x)?, want)])
    });
    Case(
        "assemble_tokens",
        format!("B={b} G={g} D={d} pos={pos}"),
        "f32",
        F32_TOL,
        run,
    )
}

/// Rows `rows` of x [M, D] (gather), then mask rows set to the token (masked image modelling).
fn select_rows(m: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (x, token) = (randn(rng, m * d, 1.0), randn(rng, d, 1.0));
        let rows: Vec<usize> = (0..m).rev().step_by(2).chain([0, m - 1]).collect();
        let mask: Vec<bool> = (0..m).map(|r| r % 3 == 1).collect();
        let xt = Tensor::from_vec(&[m, d], x.clone())?;
        let tt = Tensor::from_vec(&[d], token.clone())?;
        let want_g = backend::gather_rows(&xt, &rows)?;
        let want_m = backend::mask_rows(&xt, &mask, &tt)?;
        let (xd, td) = (dev.upload(&x)?, dev.upload(&token)?);
        let src: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let mut g = dev.zeros::<f32>(rows.len() * d)?;
        cu::elementwise::select_rows(dev, &xd, &src, None, &mut g, (m, d))?;
        let src: Vec<i32> = (0..m)
            .map(|r| if mask[r] { -1 } else { r as i32 })
            .collect();
        let mut mk = dev.zeros::<f32>(m * d)?;
        cu::elementwise::select_rows(dev, &xd, &src, Some(&td), &mut mk, (m, d))?;
        Ok(vec![
            Out("gathered", dev.download(&g)?, want_g.as_slice().to_vec()),
            Out("masked", dev.download(&mk)?, want_m.as_slice().to_vec()),
        ])
    });
    Case("select_rows", format!("[{m}, {d}]"), "f32", 0.0, run)
}

fn cast<T: Storage>(n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        // Wide range, so that rounding, subnormals (f16) and overflow to inf (f16) all occur.
        let x: Vec<f32> = randn(rng, n, 1.0)
            .iter()
            .map(|v| v * 10f32.powf(v * 3.0))
            .collect();
        let xd = dev.upload(&x)?;
        let mut out = dev.zeros::<T>(n)?;
        cu::elementwise::cast(dev, &xd, &mut out)?;
        Ok(vec![Out("out", down(dev, &out)?, rounded::<T>(&x))])
    });
    Case("cast", format!("[{n}]"), T::NAME, 0.0, run)
}

fn softmax(m: usize, n: usize, scale: f32) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x = randn(rng, m * n, 3.0);
        let mut want: Vec<f32> = x.iter().map(|v| v * scale).collect();
        cpu::vecmath::softmax_rows(&mut want, None, n);
        let xd = dev.upload(&x)?;
        let mut y = dev.zeros::<f32>(m * n)?;
        cu::softmax::rows(dev, &xd, &mut y, (m, n), scale)?;
        Ok(vec![Out("y", dev.download(&y)?, want)])
    });
    Case(
        "softmax",
        format!("[{m}, {n}] s={scale}"),
        "f32",
        F32_TOL,
        run,
    )
}

/// `gemm`: the cuBLAS path (`forward_gemm`, which f32 always takes) for bf16.
fn attention<T: Storage>(b: usize, n: usize, h: usize, dh: usize, bias: bool, gemm: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let d = h * dh;
        let qkv = rounded::<T>(&randn(rng, b * n * 3 * d, 1.0));
        let rel = randn(rng, h * n * n, 0.5);
        let dims = cpu::attention::Dims { b, n, h, dh };
        let mut want = vec![0.0; b * n * d];
        cpu::attention::forward(&qkv, bias.then_some(&rel[..]), &dims, &mut want);
        let rd = dev.upload(&rel)?;
        let gd = cu::attention::Dims { b, n, h, dh };
        let (scale, bias_d) = ((dh as f32).powf(-0.5), bias.then_some(&rd));
        let hnn = h * n * n;
        let got = match (T::NAME, gemm) {
            ("f32", _) => {
                let (qd, mut o) = (dev.upload(&qkv)?, dev.zeros::<f32>(b * n * d)?);
                let mut sc = (dev.zeros::<f32>(hnn)?, dev.zeros::<f32>(hnn)?);
                let scratch = (&mut sc.0, &mut sc.1, None);
                cu::attention::forward_gemm(dev, &qd, bias_d, &mut o, &gd, scale, scratch)?;
                dev.download(&o)?
            }
            ("bf16", true) => {
                let (qd, mut o) = (up::<bf16>(dev, &qkv)?, dev.zeros::<bf16>(b * n * d)?);
                let (s1, s2) = (dev.zeros::<f32>(hnn)?, dev.zeros::<f32>(hnn)?);
                let mut sc = (s1, s2, dev.zeros::<bf16>(hnn)?);
                let scratch = (&mut sc.0, &mut sc.1, Some(&mut sc.2));
                cu::attention::forward_gemm(dev, &qd, bias_d, &mut o, &gd, scale, scratch)?;
                down(dev, &o)?
            }
            _ => {
                let (qd, mut o) = (up::<T>(dev, &qkv)?, dev.zeros::<T>(b * n * d)?);
                cu::attention::forward(dev, &qd, bias_d, &mut o, &gd, scale)?;
                down(dev, &o)?
            }
        };
        Ok(vec![Out("out", got, want)])
    });
    let path = if gemm || T::NAME == "f32" {
        "cuBLAS"
    } else {
        "fused"
    };
    let shape = format!(
        "B={b} N={n} H={h} Dh={dh} {path}{}",
        if bias { " +bias" } else { "" }
    );
    Case("attention", shape, T::NAME, tol_for::<T>(F32_SUM_TOL), run)
}

fn im2col<T: Storage>(b: usize, c: usize, s: usize, p: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let img = randn(rng, b * c * s * s, 1.0);
        let want = rounded::<T>(&cpu::patch_embed::im2col(&img, b, c, s, s, p));
        let dims = cu::patch_embed::Dims {
            b,
            c,
            h: s,
            w: s,
            p,
        };
        let imd = dev.upload(&img)?;
        let mut cols = dev.zeros::<T>(b * dims.patches() * dims.patch_len())?;
        cu::patch_embed::im2col(dev, &imd, &mut cols, dims)?;
        Ok(vec![Out("cols", down(dev, &cols)?, want)])
    });
    Case(
        "im2col",
        format!("[{b}, {c}, {s}, {s}] P={p}"),
        T::NAME,
        0.0,
        run,
    )
}

fn patch_embed(b: usize, s: usize, p: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let c = 3;
        let img = randn(rng, b * c * s * s, 1.0);
        let w = randn(rng, d * c * p * p, 0.02);
        let bias = randn(rng, d, 0.1);
        let want = backend::patch_embed(
            &Tensor::from_vec(&[b, c, s, s], img.clone())?,
            &Tensor::from_vec(&[d, c, p, p], w.clone())?,
            &Tensor::from_vec(&[d], bias.clone())?,
        )?
        .into_vec();
        let dims = cu::patch_embed::Dims {
            b,
            c,
            h: s,
            w: s,
            p,
        };
        let (imd, wd, bd) = (dev.upload(&img)?, dev.upload(&w)?, dev.upload(&bias)?);
        let out = cu::patch_embed::forward(dev, &imd, &wd, &bd, dims, d)?;
        Ok(vec![Out("tokens", dev.download(&out)?, want)])
    });
    Case(
        "patch_embed",
        format!("[{b}, 3, {s}, {s}] P={p} D={d}"),
        "f32",
        F32_SUM_TOL,
        run,
    )
}

fn linear<T: Storage>(m: usize, k: usize, n: usize, act: Activation) -> Case
where
    CudaBlas: Gemm<T>,
{
    let run: Run = Box::new(move |dev, rng| {
        let x = rounded::<T>(&randn(rng, m * k, 1.0));
        let w = rounded::<T>(&randn(rng, n * k, (k as f32).powf(-0.5)));
        let b = randn(rng, n, 0.5);
        let want = backend::linear(
            &Tensor::from_vec(&[m, k], x.clone())?,
            &Tensor::from_vec(&[n, k], w.clone())?,
            Some(&Tensor::from_vec(&[n], b.clone())?),
            act,
        )?
        .into_vec();
        let (xd, wd, bd) = (up::<T>(dev, &x)?, up::<T>(dev, &w)?, dev.upload(&b)?);
        let mut y = dev.zeros::<T>(m * n)?;
        cu::matmul::linear(dev, &xd, &wd, Some(&bd), act, &mut y, (m, k, n))?;
        Ok(vec![Out("y", down(dev, &y)?, want)])
    });
    let op = if act == Activation::Gelu {
        "linear_gelu"
    } else {
        "linear"
    };
    Case(
        op,
        format!("M={m} K={k} N={n}"),
        T::NAME,
        tol_for::<T>(F32_SUM_TOL),
        run,
    )
}

/// cuBLASLt's linear with the bias in the GEMM's epilogue (`cu::lt::Lt::linear_bias`: qkv, proj
/// and fc2 of the forward) against the CPU linear; a refused shape is an error here.
fn linear_lt<T: Storage>(m: usize, k: usize, n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x = rounded::<T>(&randn(rng, m * k, 1.0));
        let w = rounded::<T>(&randn(rng, n * k, (k as f32).powf(-0.5)));
        let b = randn(rng, n, 0.5);
        let want = backend::linear(
            &Tensor::from_vec(&[m, k], x.clone())?,
            &Tensor::from_vec(&[n, k], w.clone())?,
            Some(&Tensor::from_vec(&[n], b.clone())?),
            Activation::None,
        )?
        .into_vec();
        let (xd, wd, bd) = (up::<T>(dev, &x)?, up::<T>(dev, &w)?, dev.upload(&b)?);
        let mut y = dev.zeros::<T>(m * n)?;
        let mut lt = cu::lt::Lt::new(dev)?;
        if !lt.linear_bias(dev, &xd, &wd, &bd, &mut y, (m, k, n))? {
            return Err(mood::Error::Cuda("cuBLASLt has no algorithm".into()));
        }
        Ok(vec![Out("y", down(dev, &y)?, want)])
    });
    Case(
        "linear_lt",
        format!("M={m} K={k} N={n}"),
        T::NAME,
        tol_for::<T>(F32_SUM_TOL),
        run,
    )
}

/// THE table. Shapes follow BEiT/ViT-Base at batch 2 (M = 2·197 tokens, D = 768, F = 3072,
/// H = 12 × 64), Large-style heads (Dh = 80, N = 257), and odd sizes that exercise the tails.
fn cases() -> Vec<Case> {
    let (m, d, f) = (2 * 197, 768, 3072);
    vec![
        layernorm_fwd::<f32>(m, d),
        layernorm_fwd::<f32>(7, 1000),
        layernorm_fwd::<bf16>(m, d),
        layernorm_from_f32::<bf16>(m, d),
        layernorm_from_f32::<f32>(7, 1000),
        residual_layernorm::<bf16>(m, d, true),
        residual_layernorm::<bf16>(5, 100, false),
        residual_layernorm::<f32>(m, d, true),
        layernorm_bwd(m, d),
        layernorm_bwd(5, 100),
        bias_act::<f32>(m, f, false),
        bias_act::<bf16>(m, f, false),
        bias_act::<f32>(m, f, true),
        bias_act::<bf16>(m, f, true),
        gelu_bwd::<f32>(m * f),
        gelu_bwd::<bf16>(m * f + 3),
        residual::<f32>(m, d, true),
        residual::<f32>(m, d, false),
        residual::<bf16>(m, d, true),
        assemble(3, 196, 768, true),
        assemble(2, 4, 48, false),
        select_rows(2 * 197, 768),
        select_rows(5, 3),
        cast::<bf16>(100_003),
        cast::<f16>(100_003),
        softmax(12 * 197, 197, 0.125),
        softmax(3, 1000, 1.0),
        attention::<bf16>(2, 197, 12, 64, true, false),
        attention::<bf16>(2, 197, 12, 64, false, false),
        attention::<f16>(1, 197, 12, 64, true, false),
        attention::<bf16>(1, 257, 16, 80, true, false),
        attention::<bf16>(3, 5, 2, 64, true, false),
        attention::<bf16>(2, 197, 12, 64, true, true),
        attention::<bf16>(2, 17, 3, 16, false, true),
        attention::<f32>(2, 197, 12, 64, true, true),
        attention::<f32>(2, 17, 3, 16, false, true),
        attention_batched::<f32>(3, 197, 2, 64, true),
        attention_batched::<f32>(2, 17, 3, 16, false),
        attention_batched::<bf16>(3, 197, 2, 64, true),
        attention_batched::<bf16>(2, 17, 3, 16, false),
        attention_batched::<bf16>(1, 257, 2, 80, true),
        tensor_core_mma(),
        im2col::<f32>(2, 3, 224, 16),
        im2col::<bf16>(1, 3, 224, 14),
        patch_embed(2, 224, 16, d),
        linear::<f32>(m, d, 3 * d, Activation::None),
        linear::<f32>(m, d, f, Activation::Gelu),
        linear::<f32>(m, f, d, Activation::None),
        linear::<f32>(2, d, 1000, Activation::None),
        linear::<f32>(3, 5, 7, Activation::Gelu),
        linear::<bf16>(m, d, 3 * d, Activation::None),
        linear::<bf16>(m, d, f, Activation::Gelu),
        linear::<bf16>(m, f, d, Activation::None),
        linear_lt::<f32>(m, d, 3 * d),
        linear_lt::<f32>(m, f, d),
        linear_lt::<f32>(3, 5, 7),
        linear_lt::<bf16>(m, d, 3 * d),
        linear_lt::<bf16>(m, d, d),
        linear_lt::<bf16>(m, f, d),
        linear_lt::<bf16>(3, 5, 7),
        sqdist(64, 1000, d),
        mahalanobis(64, 10, d),
        mahalanobis(33, 1000, 100),
        kth(64, 1000, 1),
        kth(64, 1000, 10),
        kth(3, 1000, 1000),
        topk(64, 1000, 10),
        topk(5, 300, 300),
        // The GPU scorer against the CPU detector (n train rows, m queries, C classes, D).
        scorer("mahalanobis", (4000, 1000, 100, 256), &[], 0),
        scorer("mahalanobis", (2000, 301, 10, 64), &[], 64),
        scorer("mahalanobis", (40, 50, 5, 64), &[], 0), // rank 35 < D: pinvh drops the null space
        scorer("mood-v1", (1000, 300, 5, 32), &[], 0),
        scorer("gauss", (1000, 300, 5, 32), &[], 0),
        scorer("mahalanobis-cc", (800, 300, 4, 16), &[], 100),
        scorer("knn", (3000, 500, 10, 128), &[("k", "50")], 0),
        scorer("knn", (500, 301, 10, 64), &[("k", "1")], 64),
    ]
    .into_iter()
    // Flash attention on tensor cores, forward and backward (N = 5, 17, 197, 257; B = 1, 3).
    .chain(flash_attention::cases())
    // Convolution, max-pool, global average pool and GroupNorm (ResNet, BiT).
    .chain(conv::cases())
    // BatchNorm training, the convolutional backward and SGD with momentum (ResNet training).
    .chain(conv_grad::cases())
    .collect()
}

/// The error measure itself, checked before any case relies on it.
fn check_error_measure() {
    assert_eq!(errors(&[1.0, 2.0], &[1.0, 2.0]), (0.0, 0.0));
    let (a, r) = errors(&[1.0, 0.0], &[1.0, 1e-3]);
    assert!((a - 1e-3).abs() < 1e-9 && r < 2e-3, "{a} {r}");
    assert_eq!(errors(&[f32::NAN], &[1.0]).0, f32::INFINITY);
    assert_eq!(errors(&[f32::INFINITY], &[f32::INFINITY]), (0.0, 0.0));
}

/// The elements where `got` and `want` differ most (index, got, want), worst first.
fn worst_elements(got: &[f32], want: &[f32], n: usize) -> Vec<(usize, f32, f32)> {
    let mut d: Vec<(usize, f32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| (i, errors(&[*g], &[*w]).0))
        .filter(|(_, e)| *e > 0.0)
        .collect();
    d.sort_by(|a, b| b.1.total_cmp(&a.1));
    d.into_iter()
        .take(n)
        .map(|(i, _)| (i, got[i], want[i]))
        .collect()
}

/// A test binary of its own (harness = false in Cargo.toml) so that the arguments after `--`
/// select cases by op name: `cargo test --release --test cuda_parity -- attention`.
fn main() {
    check_error_measure();
    let mut filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let Ok(f) = std::env::var("MOOD_PARITY_FILTER") {
        filters.push(f);
    }
    let Some(dev) = common::cuda::device_for_main() else {
        unreachable!("device_for_main exits where the cases ran in a child process")
    };
    let mut failures = Vec::new();
    let (mut ran, mut failed) = (0, 0);
    for (i, c) in cases().into_iter().enumerate() {
        let Case(op, shape, dtype, tol, run) = c;
        if !filters.is_empty() && !filters.iter().any(|f| op.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let before = failures.len();
        let mut rng = Rng::new(1000 + i as u64);
        let label = format!("{op:<15} {dtype:<6} {shape:<28}");
        let started = std::time::Instant::now();
        match run(&dev, &mut rng) {
            Err(e) => {
                println!("ERROR {label} {e}");
                failures.push(format!("{label}: {e}"));
            }
            Ok(outs) => {
                let secs = started.elapsed().as_secs_f32();
                for Out(name, got, want) in outs {
                    let (abs, rel) = if got.len() == want.len() {
                        errors(&got, &want)
                    } else {
                        (f32::INFINITY, f32::INFINITY)
                    };
                    let ok = rel <= tol;
                    println!(
                        "{} {label} {name:<10} max_abs {abs:.3e} max_rel {rel:.3e} tol {tol:.1e} ({secs:.2} s)",
                        if ok { "PASS " } else { "FAIL " }
                    );
                    if !ok {
                        if got.len() != want.len() {
                            println!("      {} values, the CPU op gave {}", got.len(), want.len());
                        }
                        for (j, g, w) in worst_elements(&got, &want, 5) {
                            println!("      [{j}] cuda {g:e}  cpu {w:e}");
                        }
                        failures.push(format!("{label} {name}: rel {rel:.3e} > {tol:.1e}"));
                    }
                }
            }
        }
        failed += usize::from(failures.len() > before);
    }
    if ran == 0 {
        println!("no case matches {filters:?}");
    }
    // The plain closing line CI reads, then a non-zero exit on any failure.
    println!("cuda_parity: {} passed, {failed} failed", ran - failed);
    if !failures.is_empty() {
        eprintln!("CUDA parity failures:\n{}", failures.join("\n"));
        std::process::exit(1);
    }
}
