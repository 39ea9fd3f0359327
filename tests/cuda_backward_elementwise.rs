//! The training backward's element-wise and reduction launchers, the device optimiser and the
//! loss against the CPU tape's references, from one table of cases (op, shape, outputs, each
//! with its tolerance on rel_i = |gpu_i − cpu_i| / (|cpu_i| + rms(cpu)), as tests/cuda_parity.rs):
//!   - f32 gradients: 1e-5. Most come out bit-identical, because the kernels sum in the CPU's
//!     order (chunks of 64 rows, then the chunks in order) and round products on their own (the
//!     column sums, plain and accumulated, are held to exactly 0); the
//!     exceptions are the masked-row sum (chunks of 64 masked rows against the CPU's single pass)
//!     and LayerNorm's dγ/dβ (per-block partials), still far inside 1e-5.
//!   - AdamW: 1e-6 (it is bit-exact by construction: every operation rounded on its own).
//!   - ALPA's cross-view attention terms and their backward: 1e-5 (f32 GEMMs over blocks of view
//!     pairs and warp-summed cosines, against the CPU's GEMMs in another order), also with a
//!     scratch budget small enough to split the pairs into blocks; its ReLU: exact.
//!   - grad norm, cross-entropy and MOS's group softmax: 1e-6 (both f64 inside; only the order of f64 sums differs).
//!
//! Every reduction is also run twice on the same inputs and must repeat bit for bit, and every
//! launcher refuses a buffer of the wrong length with an error, not a panic.
//!
//! Run: `cargo test --release --test cuda_backward_elementwise -- --nocapture`; without a GPU the
//! tests rerun themselves on the CPU stand-in for CUDA (tests/common/cuda.rs).

#![cfg(feature = "cuda")]

use std::collections::{BTreeMap, HashMap};

use cudarc::driver::CudaSlice;
use half::bf16;
use mood::backend::cuda::{self as cu, CudaDevice, Storage};
use mood::backend::{cpu, Pool};
use mood::model::init::Rng;
use mood::train::loss;
use mood::train::optim::{self, AdamW};
use mood::{Result, Tensor};

mod common;
use common::parity_errors as errors;

const F32_TOL: f32 = 1e-5;
const ADAMW_TOL: f32 = 1e-6;
const F64_TOL: f32 = 1e-6;

/// One output of a case: name, GPU values, CPU reference, tolerance.
struct Out(String, Vec<f32>, Vec<f32>, f32);

type Run = Box<dyn Fn(&CudaDevice, &mut Rng) -> Result<Vec<Out>>>;

/// (op name, shape, run).
struct Case(&'static str, String, Run);

fn out(name: &str, got: Vec<f32>, want: Vec<f32>, tol: f32) -> Out {
    Out(name.to_string(), got, want, tol)
}

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * std).collect()
}

/// Drop-path factors of B images at rate p: 0 or 1/(1 − p), as the tape draws them.
fn keep_factors(rng: &mut Rng, b: usize, p: f32) -> Vec<f32> {
    (0..b)
        .map(|_| {
            if rng.uniform() < p as f64 {
                0.0
            } else {
                1.0 / (1.0 - p)
            }
        })
        .collect()
}

fn sum_rows(m: usize, n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x = randn(rng, m * n, 1.0);
        let want = cpu::reduce::column_sums(&x, n);
        let xd = dev.upload(&x)?;
        let got = cu::elementwise::sum_rows(dev, &xd, (m, n))?;
        // Accumulated into an existing buffer: the CPU's acc + column_sums(x), bit for bit.
        let acc0 = randn(rng, n, 1.0);
        let mut acc = dev.upload(&acc0)?;
        cu::elementwise::sum_rows_into(dev, &xd, &mut acc, true, (m, n))?;
        let acc_want = acc0.iter().zip(&want).map(|(a, s)| a + s).collect();
        Ok(vec![
            out("sum", dev.download(&got)?, want, 0.0),
            out("sum+=", dev.download(&acc)?, acc_want, 0.0),
        ])
    });
    Case("sum_rows", format!("[{m}, {n}]"), run)
}

/// The tape's Residual backward: cpu::elementwise::residual_scaled_backward, then the drop-path
/// factor on dbranch (src/train/tape/mod.rs).
fn residual_reference(
    yv: &[f32],
    gamma: Option<&[f32]>,
    row_scale: Option<(&[f32], usize)>,
    dy: &[f32],
    d: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (mut dbranch, dgamma) = cpu::elementwise::residual_scaled_backward(yv, gamma, dy, d);
    if let Some((keep, n)) = row_scale {
        for (r, row) in dbranch.chunks_exact_mut(d).enumerate() {
            let s = keep[r / n];
            row.iter_mut().for_each(|v| *v *= s);
        }
    }
    (dbranch, dgamma)
}

fn residual<T: Storage>(b: usize, n: usize, d: usize, gamma: bool, drop: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let m = b * n;
        // The branch as the device stores it (rounded to T), so both sides read the same values.
        let yv: Vec<f32> = randn(rng, m * d, 1.0)
            .into_iter()
            .map(|v| T::from_f32(v).to_f32())
            .collect();
        let dy = randn(rng, m * d, 1.0);
        let g = randn(rng, d, 0.1);
        let keep = keep_factors(rng, b, 0.3);
        let (db_want, dg_want) = residual_reference(
            &yv,
            gamma.then_some(&g[..]),
            drop.then_some((&keep[..], n)),
            &dy,
            d,
        );
        let yv_host: Vec<T> = yv.iter().map(|&v| T::from_f32(v)).collect();
        let (yd, dyd, gd, kd) = (
            dev.upload(&yv_host)?,
            dev.upload(&dy)?,
            dev.upload(&g)?,
            dev.upload(&keep)?,
        );
        let (dbranch, dgamma) = cu::elementwise::residual_backward(
            dev,
            &yd,
            gamma.then_some(&gd),
            drop.then_some((&kd, n)),
            &dyd,
            (m, d),
        )?;
        let mut outs = vec![out("dbranch", dev.download(&dbranch)?, db_want, F32_TOL)];
        match (dgamma, dg_want) {
            (Some(got), Some(want)) => outs.push(out("dgamma", dev.download(&got)?, want, F32_TOL)),
            (None, None) => {}
            _ => outs.push(out("dgamma (presence)", vec![0.0], vec![], F32_TOL)),
        }
        Ok(outs)
    });
    let what = match (gamma, drop) {
        (true, true) => "γ, drop-path",
        (true, false) => "γ",
        (false, true) => "drop-path",
        (false, false) => "plain",
    };
    Case(
        "residual_bwd",
        format!("{} [{b}·{n}, {d}] {what}", T::NAME),
        run,
    )
}

fn scale_rows<T: Storage>(b: usize, n: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x: Vec<f32> = randn(rng, b * n * d, 1.0)
            .into_iter()
            .map(|v| T::from_f32(v).to_f32())
            .collect();
        let keep = keep_factors(rng, b, 0.4);
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| T::from_f32(v * keep[i / d / n]).to_f32())
            .collect();
        let host: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
        let mut xd = dev.upload(&host)?;
        cu::elementwise::scale_rows(dev, &mut xd, &dev.upload(&keep)?, n, d)?;
        let got = dev.download(&xd)?.into_iter().map(T::to_f32).collect();
        Ok(vec![out("x", got, want, F32_TOL)])
    });
    Case("scale_rows", format!("{} [{b}·{n}, {d}]", T::NAME), run)
}

fn pool(b: usize, n: usize, d: usize, how: Pool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let dy = randn(rng, b * d, 1.0);
        let want = match how {
            Pool::MeanPatches => cpu::reduce::mean_tokens_backward(&dy, b, n, d, 1),
            // The tape's class-token backward.
            Pool::ClassToken => {
                let mut dx = vec![0.0f32; b * n * d];
                for img in 0..b {
                    dx[img * n * d..img * n * d + d].copy_from_slice(&dy[img * d..(img + 1) * d]);
                }
                dx
            }
        };
        let got = cu::elementwise::pool_backward(dev, &dev.upload(&dy)?, (b, n, d), how)?;
        Ok(vec![out("dx", dev.download(&got)?, want, F32_TOL)])
    });
    Case("pool_bwd", format!("[{b}, {n}, {d}] {how:?}"), run)
}

fn mask_rows(m: usize, d: usize, ratio: f64) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let dy = randn(rng, m * d, 1.0);
        let mask: Vec<bool> = (0..m).map(|_| rng.uniform() < ratio).collect();
        let (dx_want, dt_want) = cpu::elementwise::mask_rows_backward(&dy, &mask, d);
        let (dx, dt) = cu::elementwise::mask_rows_backward(dev, &dev.upload(&dy)?, &mask, d)?;
        Ok(vec![
            out("dx", dev.download(&dx)?, dx_want, F32_TOL),
            out("dtoken", dev.download(&dt)?, dt_want, F32_TOL),
        ])
    });
    Case("mask_rows_bwd", format!("[{m}, {d}] masked {ratio}"), run)
}

fn gather_rows(r: usize, m: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let dy = randn(rng, r * d, 1.0);
        // Random rows with repeats (r > m forces some), and some of the m never taken.
        let rows: Vec<usize> = (0..r)
            .map(|_| (rng.uniform() * m as f64 * 0.8) as usize)
            .collect();
        let want = cpu::elementwise::gather_rows_backward(&dy, &rows, m, d);
        let got = cu::elementwise::gather_rows_backward(dev, &dev.upload(&dy)?, &rows, (m, d))?;
        Ok(vec![out("dx", dev.download(&got)?, want, F32_TOL)])
    });
    Case("gather_rows_bwd", format!("{r} rows of [{m}, {d}]"), run)
}

/// The tape's Assemble backward (src/train/tape/mod.rs): (dpatches, dcls, dpos).
fn assemble_reference(dy: &[f32], n: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dcls = vec![0.0f32; d];
    let mut dpos = vec![0.0f32; n * d];
    let mut dpatch = Vec::new();
    for img in dy.chunks_exact(n * d) {
        dcls.iter_mut().zip(&img[..d]).for_each(|(a, g)| *a += g);
        dpos.iter_mut().zip(img).for_each(|(a, g)| *a += g);
        dpatch.extend_from_slice(&img[d..]);
    }
    (dpatch, dcls, dpos)
}

fn assemble(b: usize, n: usize, d: usize, has_pos: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let dy = randn(rng, b * n * d, 1.0);
        let (dp_want, dc_want, dpos_want) = assemble_reference(&dy, n, d);
        let (dp, dc, dpos) =
            cu::elementwise::assemble_backward(dev, &dev.upload(&dy)?, (b, n, d), has_pos)?;
        let mut outs = vec![
            out("dpatches", dev.download(&dp)?, dp_want, F32_TOL),
            out("dcls", dev.download(&dc)?, dc_want, F32_TOL),
        ];
        match dpos {
            Some(p) if has_pos => outs.push(out("dpos", dev.download(&p)?, dpos_want, F32_TOL)),
            None if !has_pos => {}
            _ => outs.push(out("dpos (presence)", vec![0.0], vec![], F32_TOL)),
        }
        Ok(outs)
    });
    Case("assemble_bwd", format!("[{b}·{n}, {d}] pos {has_pos}"), run)
}

fn add_and_scale(n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (a, g) = (randn(rng, n, 1.0), randn(rng, n, 1.0));
        let mut want = a.clone();
        cpu::elementwise::add_assign_parallel(&mut want, &g);
        let mut acc = dev.upload(&a)?;
        cu::elementwise::add_assign(dev, &mut acc, &dev.upload(&g)?)?;
        let added = dev.download(&acc)?;
        let s = 0.731f32;
        let scaled_want: Vec<f32> = want.iter().map(|v| v * s).collect();
        cu::elementwise::scale(dev, &mut acc, s)?;
        Ok(vec![
            out("acc", added, want, F32_TOL),
            out("scaled", dev.download(&acc)?, scaled_want, F32_TOL),
        ])
    });
    Case("add_assign+scale", format!("[{n}]"), run)
}

fn grad_norm(lens: &'static [usize]) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let grads: Vec<Vec<f32>> = lens.iter().map(|&n| randn(rng, n, 0.01)).collect();
        let map: HashMap<String, Vec<f32>> = grads
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("p{i}"), g.clone()))
            .collect();
        let want = optim::grad_norm(&map);
        let dg: Vec<CudaSlice<f32>> = grads.iter().map(|g| dev.upload(g)).collect::<Result<_>>()?;
        let refs: Vec<&CudaSlice<f32>> = dg.iter().collect();
        let got = cu::optim::grad_norm(dev, &refs)?;
        Ok(vec![out("norm", vec![got], vec![want], F64_TOL)])
    });
    Case("grad_norm", format!("{} tensors {lens:?}", lens.len()), run)
}

/// A small BEiT's parameter names and shapes (depth 2): every weight-decay group and layer id.
fn beit_params(d: usize) -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("cls_token".to_string(), vec![1, 1, d]),
        ("pos_embed".into(), vec![1, 17, d]),
        ("patch_embed.proj.weight".into(), vec![d, 3, 4, 4]),
        ("patch_embed.proj.bias".into(), vec![d]),
    ];
    for i in 0..2 {
        for (name, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.q_bias", vec![d]),
            ("attn.relative_position_bias_table", vec![58, 4]),
            ("gamma_1", vec![d]),
            ("mlp.fc1.weight", vec![4 * d, d]),
            ("mlp.fc1.bias", vec![4 * d]),
        ] {
            v.push((format!("blocks.{i}.{name}"), shape));
        }
    }
    v.push(("fc_norm.weight".into(), vec![d]));
    v.push(("head.weight".into(), vec![10, d]));
    v.push(("head.bias".into(), vec![10]));
    v
}

/// Three AdamW steps on the CPU and on the device from the same start (one step leaves out a
/// gradient, as a frozen or unused parameter), then a device optimiser restored from the CPU's
/// state takes a fourth step on both.
fn adamw(d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let specs = beit_params(d);
        let shapes: Vec<(&str, &[usize])> = specs
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let mut cpu_params: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, shape) in &specs {
            let n = shape.iter().product();
            cpu_params.insert(name.clone(), Tensor::from_vec(shape, randn(rng, n, 0.05))?);
        }
        let mut dev_params: Vec<CudaSlice<f32>> = specs
            .iter()
            .map(|(n, _)| dev.upload(cpu_params[n].as_slice()))
            .collect::<Result<_>>()?;
        let mut cpu_opt = AdamW::new(0.05, 0.75, 2);
        let mut dev_opt = cu::optim::DeviceAdamW::new(dev, &shapes, 0.05, 0.75, 2)?;
        let mut outs = Vec::new();
        let steps = [
            (1e-3f32, 1.0f32, None),
            (5e-4, 0.37, Some("head.bias")),
            (2e-4, 0.9, None),
        ];
        for (k, &(lr, scale, skip)) in steps.iter().enumerate() {
            let grads: HashMap<String, Vec<f32>> = specs
                .iter()
                .filter(|(n, _)| Some(n.as_str()) != skip)
                .map(|(n, s)| (n.clone(), randn(rng, s.iter().product(), 1.0)))
                .collect();
            cpu_opt.update_scaled(&mut cpu_params, &grads, lr, scale);
            device_step(
                dev,
                &mut dev_opt,
                &specs,
                &mut dev_params,
                &grads,
                lr,
                scale,
            )?;
            if k == 0 || k == steps.len() - 1 {
                outs.push(out(
                    &format!("params step {}", k + 1),
                    flat(dev, &dev_params)?,
                    specs
                        .iter()
                        .flat_map(|(n, _)| cpu_params[n].as_slice().to_vec())
                        .collect(),
                    ADAMW_TOL,
                ));
            }
        }
        let (cm, cv) = cpu_opt.moments();
        let (dm, dv) = dev_opt.moments(dev)?;
        let mut names: Vec<&String> = cm.keys().collect();
        names.sort();
        let dnames = {
            let mut v: Vec<&String> = dm.keys().collect();
            v.sort();
            v
        };
        if names != dnames {
            outs.push(out("moment names", vec![0.0], vec![], ADAMW_TOL));
        }
        let pick = |m: &HashMap<String, Vec<f32>>| -> Vec<f32> {
            names
                .iter()
                .flat_map(|n| m.get(*n).cloned().unwrap_or_default())
                .collect()
        };
        outs.push(out("m", pick(&dm), pick(cm), ADAMW_TOL));
        outs.push(out("v", pick(&dv), pick(cv), ADAMW_TOL));
        // A checkpoint's restore: the CPU state onto a fresh device optimiser, one more step.
        let mut restored = cu::optim::DeviceAdamW::from_cpu(dev, &cpu_opt, &shapes)?;
        let grads: HashMap<String, Vec<f32>> = specs
            .iter()
            .map(|(n, s)| (n.clone(), randn(rng, s.iter().product(), 1.0)))
            .collect();
        let mut params2: Vec<CudaSlice<f32>> = specs
            .iter()
            .map(|(n, _)| dev.upload(cpu_params[n].as_slice()))
            .collect::<Result<_>>()?;
        cpu_opt.update_scaled(&mut cpu_params, &grads, 3e-4, 0.5);
        device_step(dev, &mut restored, &specs, &mut params2, &grads, 3e-4, 0.5)?;
        outs.push(out(
            "params after restore + step",
            flat(dev, &params2)?,
            specs
                .iter()
                .flat_map(|(n, _)| cpu_params[n].as_slice().to_vec())
                .collect(),
            ADAMW_TOL,
        ));
        Ok(outs)
    });
    Case("adamw", format!("BEiT depth 2, D = {d}"), run)
}

fn flat(dev: &CudaDevice, bufs: &[CudaSlice<f32>]) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    for b in bufs {
        v.extend(dev.download(b)?);
    }
    Ok(v)
}

/// One `DeviceAdamW::step` over the parameters that have a gradient in `grads`.
fn device_step(
    dev: &CudaDevice,
    opt: &mut cu::optim::DeviceAdamW,
    specs: &[(String, Vec<usize>)],
    params: &mut [CudaSlice<f32>],
    grads: &HashMap<String, Vec<f32>>,
    lr: f32,
    scale: f32,
) -> Result<()> {
    let dg: Vec<Option<CudaSlice<f32>>> = specs
        .iter()
        .map(|(n, _)| grads.get(n).map(|g| dev.upload(g)).transpose())
        .collect::<Result<_>>()?;
    let mut list: Vec<cu::optim::StepParam> = specs
        .iter()
        .zip(params.iter_mut())
        .zip(&dg)
        .filter_map(|(((n, _), p), g)| g.as_ref().map(|g| (n.as_str(), p, g)))
        .collect();
    opt.step(dev, &mut list, lr, scale)
}

fn cross_entropy(b: usize, c: usize, smoothing: f32) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let z = randn(rng, b * c, 3.0);
        let labels: Vec<usize> = (0..b)
            .map(|_| (rng.uniform() * c as f64) as usize)
            .collect();
        let (lw, gw) = loss::cross_entropy(&z, &labels, c, smoothing);
        let (l, g) = cu::loss::cross_entropy(dev, &dev.upload(&z)?, &labels, c, smoothing)?;
        Ok(vec![
            out("loss", vec![l], vec![lw], F64_TOL),
            out("dlogits", dev.download(&g)?, gw, F64_TOL),
        ])
    });
    Case("cross_entropy", format!("[{b}, {c}] ε = {smoothing}"), run)
}

fn group_softmax(b: usize, groups: &'static [usize]) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let width: usize = groups.iter().map(|s| s + 1).sum();
        let classes: usize = groups.iter().sum();
        let z = randn(rng, b * width, 3.0);
        let labels: Vec<usize> = (0..b)
            .map(|_| (rng.uniform() * classes as f64) as usize)
            .collect();
        let per_group = loss::group_targets(&labels, groups)?;
        let (lw, gw) = loss::group_softmax(&z, groups, &per_group);
        let (l, g) = cu::loss::group_softmax(dev, &dev.upload(&z)?, groups, &per_group)?;
        Ok(vec![
            out("loss", vec![l], vec![lw], F64_TOL),
            out("dlogits", dev.download(&g)?, gw, F64_TOL),
        ])
    });
    Case("group_softmax", format!("[{b}] groups {groups:?}"), run)
}

/// ALPA's ReLU and its backward against the CPU executor's.
fn alpa_relu(n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (x, dy) = (randn(rng, n, 1.0), randn(rng, n, 1.0));
        let y_want: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
        let dx_want: Vec<f32> = dy
            .iter()
            .zip(&y_want)
            .map(|(g, &y)| if y > 0.0 { *g } else { 0.0 })
            .collect();
        let y = cu::loss::alpa_relu(dev, &dev.upload(&x)?)?;
        let mut dx = dev.upload(&dy)?;
        cu::loss::alpa_relu_backward(dev, &y, &mut dx)?;
        Ok(vec![
            out("y", dev.download(&y)?, y_want, 0.0),
            out("dx", dev.download(&dx)?, dx_want, 0.0),
        ])
    });
    Case("alpa_relu", format!("[{n}]"), run)
}

/// ALPA's cross-view attention terms [M, M] and their backward (dq, dk, dv) against
/// `train::alpa::alpa_terms{,_backward}`; g has zeros on the diagonal, as SupCon's does. With
/// `scratch`, the launchers get that budget instead of `ALPA_SCRATCH_BYTES`, so that the view
/// pairs go in several blocks (the case checks that they do).
fn alpa_terms(m: usize, t: usize, d: usize, scratch: Option<usize>) -> Case {
    let budget = scratch.unwrap_or(cu::loss::ALPA_SCRATCH_BYTES);
    let run: Run = Box::new(move |dev, rng| {
        let n = m * t * d;
        if scratch.is_some() {
            // One view pair's scratch: the floor whatever the budget.
            let pair = |grads| 4 * t * (t * if grads { 2 } else { 1 } + d);
            for grads in [false, true] {
                let used = cu::loss::alpa_scratch_bytes((m, t, d), grads, budget);
                assert!(
                    used <= budget.max(pair(grads)) && used < m * m * pair(grads),
                    "alpa scratch {used} B for budget {budget} B (all pairs: {} B)",
                    m * m * pair(grads)
                );
            }
        }
        let (q, k, v) = (randn(rng, n, 1.0), randn(rng, n, 1.0), randn(rng, n, 1.0));
        let g: Vec<f32> = (0..m * m)
            .map(|i| {
                if i / m == i % m {
                    0.0
                } else {
                    rng.normal() as f32
                }
            })
            .collect();
        let terms_want = mood::train::alpa::alpa_terms(&q, &k, &v, m, d);
        let (dq_w, dk_w, dv_w) = mood::train::alpa::alpa_terms_backward(&q, &k, &v, m, d, &g);
        let (qd, kd, vd) = (dev.upload(&q)?, dev.upload(&k)?, dev.upload(&v)?);
        let terms = cu::loss::alpa_terms_with_scratch(dev, &qd, &kd, &vd, (m, t, d), budget)?;
        let (dq, dk, dv) = cu::loss::alpa_terms_backward_with_scratch(
            dev,
            &qd,
            &kd,
            &vd,
            &dev.upload(&g)?,
            (m, t, d),
            budget,
        )?;
        Ok(vec![
            out("terms", dev.download(&terms)?, terms_want, F32_TOL),
            out("dq", dev.download(&dq)?, dq_w, F32_TOL),
            out("dk", dev.download(&dk)?, dk_w, F32_TOL),
            out("dv", dev.download(&dv)?, dv_w, F32_TOL),
        ])
    });
    let shape = match scratch {
        Some(b) => format!("M = {m}, T = {t}, d = {d}, {b} B"),
        None => format!("M = {m}, T = {t}, d = {d}"),
    };
    Case("alpa_terms", shape, run)
}

fn mse(r: usize, k: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (p, t) = (randn(rng, r * k, 1.0), randn(rng, r * k, 1.0));
        let (lw, gw) = mood::train::mim::mse(&p, &t);
        let (l, g) = cu::loss::mse(dev, &dev.upload(&p)?, &dev.upload(&t)?, (r, k))?;
        Ok(vec![
            out("loss", vec![l], vec![lw], F64_TOL),
            out("dpred", dev.download(&g)?, gw, F64_TOL),
        ])
    });
    Case("mse", format!("[{r}, {k}]"), run)
}

fn layernorm_bwd(m: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (x, g, b, dy) = (
            randn(rng, m * d, 2.0),
            randn(rng, d, 1.0),
            randn(rng, d, 1.0),
            randn(rng, m * d, 1.0),
        );
        let (dx_want, dg_want, db_want) = cpu::layernorm::backward(&x, &g, 1e-6, &dy);
        let (dx, dg, db) = layernorm_device(dev, &x, &g, &b, &dy, (m, d))?;
        Ok(vec![
            out("dx", dx, dx_want, F32_TOL),
            out("dgamma", dg, dg_want, F32_TOL),
            out("dbeta", db, db_want, F32_TOL),
        ])
    });
    Case("layernorm_bwd", format!("[{m}, {d}]"), run)
}

/// The device LayerNorm forward (saving mean, rstd) then backward: (dx, dγ, dβ) downloaded.
fn layernorm_device(
    dev: &CudaDevice,
    x: &[f32],
    g: &[f32],
    b: &[f32],
    dy: &[f32],
    (m, d): (usize, usize),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (xd, gd, bd, dyd) = (
        dev.upload(x)?,
        dev.upload(g)?,
        dev.upload(b)?,
        dev.upload(dy)?,
    );
    let mut y = dev.zeros::<f32>(m * d)?;
    let (mut mu, mut rs) = (dev.zeros::<f32>(m)?, dev.zeros::<f32>(m)?);
    cu::layernorm::forward(
        dev,
        &xd,
        &gd,
        &bd,
        &mut y,
        Some((&mut mu, &mut rs)),
        (m, d),
        1e-6,
    )?;
    let mut dx = dev.zeros::<f32>(m * d)?;
    let (dg, db) = cu::layernorm::backward(dev, &xd, &gd, &mu, &rs, &dyd, &mut dx, (m, d))?;
    Ok((dev.download(&dx)?, dev.download(&dg)?, dev.download(&db)?))
}

fn cases() -> Vec<Case> {
    vec![
        sum_rows(1, 5),
        sum_rows(130, 7),
        sum_rows(64 * 197, 768),
        sum_rows(2 * 197 + 5, 3072),
        residual::<f32>(3, 50, 40, true, true),
        residual::<f32>(2, 197, 96, true, false),
        residual::<f32>(4, 17, 33, false, true),
        residual::<f32>(2, 9, 16, false, false),
        residual::<bf16>(3, 50, 40, true, true),
        scale_rows::<f32>(5, 17, 24),
        scale_rows::<bf16>(5, 17, 24),
        pool(3, 17, 40, Pool::MeanPatches),
        pool(3, 17, 40, Pool::ClassToken),
        mask_rows(300, 64, 0.4),
        mask_rows(5, 8, 0.0),
        gather_rows(120, 50, 24),
        gather_rows(7, 30, 5),
        assemble(4, 17, 48, true),
        assemble(3, 5, 7, false),
        add_and_scale(10_000),
        grad_norm(&[5, 40_000, 768, 3 * 16384 + 1, 16384]),
        adamw(48),
        cross_entropy(5, 7, 0.0),
        cross_entropy(64, 1000, 0.1),
        cross_entropy(3, 1, 0.1),
        group_softmax(5, &[2, 3]),
        group_softmax(64, &[40, 1, 70, 3]),
        group_softmax(3, &[1]),
        alpa_relu(1000),
        alpa_terms(6, 16, 8, None),
        alpa_terms(4, 49, 80, None),
        alpa_terms(2, 1, 3, None),
        alpa_terms(1, 7, 5, None),
        // 6 pairs' backward scratch (9 of the forward's): blocks of 1 query view × 4, then 3,
        // source views backward, 1 × 7 forward.
        alpa_terms(7, 9, 8, Some(6 * 4 * (2 * 81 + 9 * 8))),
        // Less than one pair: one pair per block.
        alpa_terms(3, 5, 4, Some(1)),
        mse(37, 48),
        mse(3, 1),
        layernorm_bwd(300, 64),
        layernorm_bwd(2 * 197, 768),
    ]
}

#[test]
fn backward_launchers_match_the_cpu() {
    let Some(dev) = common::cuda::device("backward_launchers_match_the_cpu") else {
        return;
    };
    let mut failures = Vec::new();
    for (i, Case(op, shape, run)) in cases().into_iter().enumerate() {
        let mut rng = Rng::new(7000 + i as u64);
        let label = format!("{op:<17} {shape:<34}");
        let started = std::time::Instant::now();
        match run(&dev, &mut rng) {
            Err(e) => {
                println!("ERROR {label} {e}");
                failures.push(format!("{label}: {e}"));
            }
            Ok(outs) => {
                let secs = started.elapsed().as_secs_f32();
                for Out(name, got, want, tol) in outs {
                    let (abs, rel) = if got.len() == want.len() {
                        errors(&got, &want)
                    } else {
                        (f32::INFINITY, f32::INFINITY)
                    };
                    let exact = got.len() == want.len()
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                    let ok = rel <= tol;
                    println!(
                        "{} {label} {name:<28} max_abs {abs:.3e} max_rel {rel:.3e} tol {tol:.0e}{} ({secs:.2} s)",
                        if ok { "PASS " } else { "FAIL " },
                        if exact { " bit-exact" } else { "" }
                    );
                    if !ok {
                        failures.push(format!("{label} {name}: rel {rel:.3e} > {tol:.0e}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:#?}");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each reduction twice on the same inputs: the same bits (fixed summation order, no atomics).
#[test]
fn reductions_repeat_bit_for_bit() {
    let Some(dev) = common::cuda::device("reductions_repeat_bit_for_bit") else {
        return;
    };
    let dev = &dev;
    let mut rng = Rng::new(99);
    let (m, d) = (2 * 197 + 3, 256);
    let x = randn(&mut rng, m * d, 1.0);
    let y = randn(&mut rng, m * d, 1.0);
    let g = randn(&mut rng, d, 0.1);
    let keep = keep_factors(&mut rng, 1, 0.2);
    let mask: Vec<bool> = (0..m).map(|_| rng.uniform() < 0.4).collect();
    let rows: Vec<usize> = (0..3 * m).map(|i| (i * 7) % m).collect();
    let dy_rows = randn(&mut rng, 3 * m * d, 1.0);
    let labels: Vec<usize> = (0..m).map(|i| i % 100).collect();
    let z = randn(&mut rng, m * 100, 2.0);

    let run = |label: &str, f: &dyn Fn() -> Result<Vec<u32>>| {
        let a = f().unwrap_or_else(|e| panic!("{label}: {e}"));
        let b = f().unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(!a.is_empty(), "{label}: empty");
        assert_eq!(a, b, "{label}: two runs differ");
        println!("{label}: {} values, identical bits", a.len());
    };
    let (xd, yd, gd, kd) = (
        dev.upload(&x).unwrap(),
        dev.upload(&y).unwrap(),
        dev.upload(&g).unwrap(),
        dev.upload(&keep).unwrap(),
    );
    run("sum_rows", &|| {
        dev.download(&cu::elementwise::sum_rows(dev, &xd, (m, d))?)
            .map(|v| bits(&v))
    });
    run("residual_backward dγ", &|| {
        let (db, dg) =
            cu::elementwise::residual_backward(dev, &yd, Some(&gd), Some((&kd, m)), &xd, (m, d))?;
        let mut v = bits(&dev.download(&dg.expect("dγ"))?);
        v.extend(bits(&dev.download(&db)?));
        Ok(v)
    });
    run("mask_rows_backward dtoken", &|| {
        let (_, dt) = cu::elementwise::mask_rows_backward(dev, &xd, &mask, d)?;
        dev.download(&dt).map(|v| bits(&v))
    });
    let dyr = dev.upload(&dy_rows).unwrap();
    run("gather_rows_backward (repeated rows)", &|| {
        let dx = cu::elementwise::gather_rows_backward(dev, &dyr, &rows, (m, d))?;
        dev.download(&dx).map(|v| bits(&v))
    });
    run("assemble_backward dcls, dpos", &|| {
        let (_, dc, dp) = cu::elementwise::assemble_backward(dev, &dyr, (3, m, d), true)?;
        let mut v = bits(&dev.download(&dc)?);
        v.extend(bits(&dev.download(&dp.expect("dpos"))?));
        Ok(v)
    });
    run("grad_sq_norm", &|| {
        let sq = dev.download(&cu::optim::grad_sq_norm(dev, &[&xd, &yd, &gd])?)?;
        Ok(vec![(sq[0].to_bits() >> 32) as u32, sq[0].to_bits() as u32])
    });
    let zd = dev.upload(&z).unwrap();
    run("cross_entropy loss, dlogits", &|| {
        let (l, dz) = cu::loss::cross_entropy(dev, &zd, &labels, 100, 0.1)?;
        let mut v = vec![l.to_bits()];
        v.extend(bits(&dev.download(&dz)?));
        Ok(v)
    });
    let groups = [30, 1, 69];
    let per_group = loss::group_targets(&labels, &groups).unwrap();
    let zg = dev.upload(&randn(&mut rng, m * 103, 2.0)).unwrap();
    run("group_softmax loss, dlogits", &|| {
        let (l, dz) = cu::loss::group_softmax(dev, &zg, &groups, &per_group)?;
        let mut v = vec![l.to_bits()];
        v.extend(bits(&dev.download(&dz)?));
        Ok(v)
    });
    let (qa, ka, va) = (
        dev.upload(&randn(&mut rng, 6 * 16 * 8, 1.0)).unwrap(),
        dev.upload(&randn(&mut rng, 6 * 16 * 8, 1.0)).unwrap(),
        dev.upload(&randn(&mut rng, 6 * 16 * 8, 1.0)).unwrap(),
    );
    let ga = dev.upload(&randn(&mut rng, 36, 1.0)).unwrap();
    run("alpa_terms, backward dq, dk, dv", &|| {
        let mut v = bits(&dev.download(&cu::loss::alpa_terms(dev, &qa, &ka, &va, (6, 16, 8))?)?);
        let (dq, dk, dv) = cu::loss::alpa_terms_backward(dev, &qa, &ka, &va, &ga, (6, 16, 8))?;
        for g in [dq, dk, dv] {
            v.extend(bits(&dev.download(&g)?));
        }
        Ok(v)
    });
    let b = randn(&mut rng, d, 1.0);
    run("layernorm backward dγ, dβ", &|| {
        let (dx, dg, db) = layernorm_device(dev, &x, &g, &b, &y, (m, d))?;
        Ok([dx, dg, db].iter().flat_map(|v| bits(v)).collect())
    });
    run("adamw step", &|| {
        let mut p = dev.upload(&x)?;
        let shapes: [(&str, &[usize]); 1] = [("blocks.0.mlp.fc1.weight", &[m, d])];
        let mut opt = cu::optim::DeviceAdamW::new(dev, &shapes, 0.05, 0.75, 2)?;
        for _ in 0..2 {
            opt.step(dev, &mut [(shapes[0].0, &mut p, &yd)], 1e-3, 0.5)?;
        }
        dev.download(&p).map(|v| bits(&v))
    });
}

/// Every launcher refuses inconsistent lengths with an error (one line), never a panic.
#[test]
fn bad_lengths_are_errors() {
    let Some(dev) = common::cuda::device("bad_lengths_are_errors") else {
        return;
    };
    let dev = &dev;
    let buf = |n: usize| dev.zeros::<f32>(n).unwrap();
    let (x12, x5, x4) = (buf(12), buf(5), buf(4));
    let mut errs: Vec<(&str, mood::Error)> = Vec::new();
    let mut expect_err = |what: &'static str, r: Result<()>| match r {
        Ok(()) => panic!("{what}: accepted"),
        Err(e) => errs.push((what, e)),
    };
    expect_err(
        "sum_rows",
        cu::elementwise::sum_rows(dev, &x12, (5, 3)).map(drop),
    );
    let mut out4 = buf(4);
    expect_err(
        "sum_rows_into out",
        cu::elementwise::sum_rows_into(dev, &x12, &mut out4, true, (4, 3)),
    );
    expect_err(
        "assemble without patches",
        cu::elementwise::assemble_backward(dev, &x4, (1, 1, 4), true).map(drop),
    );
    expect_err(
        "cross_entropy empty",
        cu::loss::cross_entropy(dev, &x4, &[], 0, 0.0).map(drop),
    );
    expect_err(
        "group_softmax logits",
        cu::loss::group_softmax(dev, &x12, &[2, 3], &[vec![1, 0], vec![0, 3]]).map(drop),
    );
    expect_err(
        "group_softmax label beyond its group",
        cu::loss::group_softmax(dev, &x4, &[3], &[vec![4]]).map(drop),
    );
    expect_err(
        "alpa_terms q, k, v",
        cu::loss::alpa_terms(dev, &x12, &x12, &x5, (1, 3, 4)).map(drop),
    );
    expect_err(
        "alpa_terms_backward g",
        cu::loss::alpa_terms_backward(dev, &x12, &x12, &x12, &x5, (1, 3, 4)).map(drop),
    );
    expect_err(
        "alpa_relu_backward",
        cu::loss::alpa_relu_backward(dev, &x12, &mut buf(5)),
    );
    expect_err(
        "residual γ",
        cu::elementwise::residual_backward(dev, &x12, Some(&x5), None, &x12, (3, 4)).map(drop),
    );
    expect_err(
        "residual keep",
        cu::elementwise::residual_backward::<f32>(dev, &x12, None, Some((&x5, 2)), &x12, (3, 4))
            .map(drop),
    );
    expect_err(
        "residual dy",
        cu::elementwise::residual_backward::<f32>(dev, &x12, None, None, &x5, (3, 4)).map(drop),
    );
    expect_err(
        "scale_rows",
        cu::elementwise::scale_rows(dev, &mut buf(12), &x5, 2, 1),
    );
    expect_err(
        "pool mean of 1 token",
        cu::elementwise::pool_backward(dev, &x4, (1, 1, 4), Pool::MeanPatches).map(drop),
    );
    expect_err(
        "pool dy",
        cu::elementwise::pool_backward(dev, &x5, (1, 3, 4), Pool::ClassToken).map(drop),
    );
    expect_err(
        "mask_rows",
        cu::elementwise::mask_rows_backward(dev, &x12, &[true, false], 4).map(drop),
    );
    expect_err(
        "gather_rows out of range",
        cu::elementwise::gather_rows_backward(dev, &x12, &[0, 3, 9], (4, 4)).map(drop),
    );
    expect_err(
        "gather_rows dy",
        cu::elementwise::gather_rows_backward(dev, &x5, &[0, 1], (4, 4)).map(drop),
    );
    expect_err(
        "assemble",
        cu::elementwise::assemble_backward(dev, &x5, (1, 3, 4), true).map(drop),
    );
    expect_err(
        "add_assign",
        cu::elementwise::add_assign(dev, &mut buf(4), &x5),
    );
    expect_err(
        "cross_entropy label",
        cu::loss::cross_entropy(dev, &x12, &[0, 4, 1], 4, 0.0).map(drop),
    );
    expect_err(
        "cross_entropy logits",
        cu::loss::cross_entropy(dev, &x12, &[0, 1], 4, 0.0).map(drop),
    );
    let shapes: [(&str, &[usize]); 2] = [("head.weight", &[3, 4]), ("head.bias", &[3])];
    let mut opt = cu::optim::DeviceAdamW::new(dev, &shapes, 0.05, 0.75, 1).unwrap();
    let (mut w, mut bias, mut bias2, x3) = (buf(12), buf(3), buf(3), buf(3));
    expect_err(
        "adamw unknown name",
        opt.step(dev, &mut [("head.other", &mut w, &x12)], 1e-3, 1.0),
    );
    expect_err(
        "adamw gradient length",
        opt.step(dev, &mut [("head.weight", &mut w, &x5)], 1e-3, 1.0),
    );
    expect_err(
        "adamw twice",
        opt.step(
            dev,
            &mut [
                ("head.bias", &mut bias, &x3),
                ("head.bias", &mut bias2, &x3),
            ],
            1e-3,
            1.0,
        ),
    );
    assert_eq!(opt.step, 0, "a refused step must not count");
    let mut m = HashMap::new();
    m.insert("head.weight".to_string(), vec![0.0; 11]);
    expect_err(
        "adamw restore length",
        opt.restore(dev, 3, &m, &HashMap::new()),
    );
    m.clear();
    m.insert("nope".to_string(), vec![0.0; 3]);
    expect_err(
        "adamw restore name",
        opt.restore(dev, 3, &m, &HashMap::new()),
    );
    expect_err(
        "adamw duplicate registration",
        cu::optim::DeviceAdamW::new(dev, &[("a", &[2]), ("a", &[2])], 0.0, 1.0, 1).map(drop),
    );
    for (what, e) in &errs {
        let line = e.to_string();
        println!("{what}: {line}");
        assert!(!line.contains('\n'), "{what}: the error is not one line");
    }
    // Empty inputs are fine, not errors.
    assert_eq!(cu::optim::grad_norm(dev, &[]).unwrap(), 0.0);
}

/// ALPA's cross terms and their backward at a training-like size (M = 16 views, T = 49 tokens,
/// d = 64), under the default scratch budget and one that splits the view pairs into blocks:
/// each twice, the same bits, and the time of one forward + backward printed (on the CPU stand-in
/// only a relative figure, not a GPU time).
#[test]
fn alpa_terms_repeat_at_size() {
    let Some(dev) = common::cuda::device("alpa_terms_repeat_at_size") else {
        return;
    };
    let dev = &dev;
    let (m, t, d) = (16, 49, 64);
    let mut rng = Rng::new(4242);
    let n = m * t * d;
    let (q, k, v) = (
        dev.upload(&randn(&mut rng, n, 1.0)).unwrap(),
        dev.upload(&randn(&mut rng, n, 1.0)).unwrap(),
        dev.upload(&randn(&mut rng, n, 1.0)).unwrap(),
    );
    let g = dev.upload(&randn(&mut rng, m * m, 1.0)).unwrap();
    let once = |budget: usize| -> Result<(Vec<u32>, f64)> {
        let started = std::time::Instant::now();
        let terms = cu::loss::alpa_terms_with_scratch(dev, &q, &k, &v, (m, t, d), budget)?;
        let (dq, dk, dv) =
            cu::loss::alpa_terms_backward_with_scratch(dev, &q, &k, &v, &g, (m, t, d), budget)?;
        let mut out = bits(&dev.download(&terms)?);
        for x in [dq, dk, dv] {
            out.extend(bits(&dev.download(&x)?));
        }
        Ok((out, started.elapsed().as_secs_f64()))
    };
    for budget in [cu::loss::ALPA_SCRATCH_BYTES, 1 << 20] {
        let (a, ta) = once(budget).unwrap();
        let (b, tb) = once(budget).unwrap();
        assert_eq!(
            a, b,
            "alpa_terms at M = {m}, T = {t}, d = {d}: two runs differ"
        );
        println!(
            "alpa_terms + backward, M = {m}, T = {t}, d = {d}, scratch {} B of {budget} B: \
             {ta:.3} s, {tb:.3} s (identical bits)",
            cu::loss::alpa_scratch_bytes((m, t, d), true, budget)
        );
    }
}

/// ALPA's scratch at BEiT's sizes (M = 64 views, T = 196 tokens, d = 80) stays within
/// `ALPA_SCRATCH_BYTES`, forward and backward, and is printed.
#[test]
fn alpa_scratch_is_bounded() {
    let budget = cu::loss::ALPA_SCRATCH_BYTES;
    for dims in [(64, 196, 80), (64, 196, 64), (256, 196, 80), (2, 4096, 80)] {
        for grads in [false, true] {
            let used = cu::loss::alpa_scratch_bytes(dims, grads, budget);
            println!(
                "alpa scratch (M, T, d) = {dims:?} {}: {used} B ({:.1} MiB, budget {} MiB)",
                if grads { "backward" } else { "forward" },
                used as f64 / (1 << 20) as f64,
                budget >> 20
            );
            assert!(used <= budget, "{dims:?}: {used} B > {budget} B");
        }
    }
}
