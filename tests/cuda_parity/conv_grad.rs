//! Case builders of tests/cuda_parity.rs for the ResNet training kernels (kernels/conv_grad.cu),
//! each against its CPU op (src/backend/cpu/conv_grad.rs; SGD against `train::mode::sgd_update`)
//! on NHWC maps: BatchNorm's training forward and backward, ReLU and its backward, the max-pool
//! and global-average-pool backward, the convolution backward (7×7/2 stem, 3×3 same and strided,
//! 1×1 strided and direct, a non-square map, a batch run over chunks) and SGD with momentum.
//! Tolerances: elementwise results exact (0: each f32 operation rounds as on the CPU, the gathers
//! add in the CPU's order); BatchNorm F32_TOL (f64 channel sums in another order); the
//! convolution F32_SUM_TOL (cuBLAS sums K products in another order). `conv_grad_repeat` runs
//! every launcher twice and fails unless the two runs agree bit for bit.

use std::collections::{BTreeMap, HashMap};

use super::{cpu, cu, randn, Case, Out, Run, F32_SUM_TOL, F32_TOL};
use cpu::conv::Conv;
use mood::model::init::Rng;
use mood::train::mode::{sgd_update, ModeSettings};
use mood::{Error, Result, Tensor};

/// x with a per-channel offset and scale, so that the two-pass variance has something to cancel.
fn offset_map(rng: &mut Rng, rows: usize, c: usize) -> Vec<f32> {
    let shift = randn(rng, c, 3.0);
    randn(rng, rows * c, 2.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v + shift[i % c])
        .collect()
}

pub fn batch_norm_train((b, h, w, c): (usize, usize, usize, usize)) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let rows = b * h * w;
        let x = offset_map(rng, rows, c);
        let (g, be) = (randn(rng, c, 1.0), randn(rng, c, 1.0));
        let rm0 = randn(rng, c, 0.5);
        let rv0: Vec<f32> = randn(rng, c, 1.0).iter().map(|v| 1.0 + v.abs()).collect();
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        let (want, saved) =
            cpu::conv_grad::batch_norm_train(&x, c, (&g, &be), (&mut rm, &mut rv), 0.1, 1e-5);
        let (xd, gd, bd) = (dev.upload(&x)?, dev.upload(&g)?, dev.upload(&be)?);
        let (mut rmd, mut rvd) = (dev.upload(&rm0)?, dev.upload(&rv0)?);
        let (y, gs) = cu::conv_grad::batch_norm_train(
            dev,
            &xd,
            c,
            (&gd, &bd),
            (&mut rmd, &mut rvd),
            0.1,
            1e-5,
        )?;
        Ok(vec![
            Out("y", dev.download(&y)?, want),
            Out("xhat", dev.download(&gs.xhat)?, saved.xhat),
            Out("rstd", dev.download(&gs.rstd)?, saved.rstd),
            Out("run_mean", dev.download(&rmd)?, rm),
            Out("run_var", dev.download(&rvd)?, rv),
        ])
    });
    Case(
        "batch_norm_train",
        format!("[{b}, {h}, {w}, {c}]"),
        "f32",
        F32_TOL,
        run,
    )
}

/// The backward from the CPU forward's saved x̂ and rstd, so that only the backward is compared.
pub fn batch_norm_backward((b, h, w, c): (usize, usize, usize, usize)) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let rows = b * h * w;
        let x = offset_map(rng, rows, c);
        let (g, be) = (randn(rng, c, 1.0), randn(rng, c, 1.0));
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        let (_, saved) =
            cpu::conv_grad::batch_norm_train(&x, c, (&g, &be), (&mut rm, &mut rv), 0.1, 1e-5);
        // A gradient with a mean of its own per channel: mean(g) must be removed.
        let dy = offset_map(rng, rows, c);
        let (dx, dg, db) = cpu::conv_grad::batch_norm_backward(&dy, c, &g, &saved);
        let gs = cu::conv_grad::BatchNormSaved {
            xhat: dev.upload(&saved.xhat)?,
            rstd: dev.upload(&saved.rstd)?,
        };
        let (dyd, gd) = (dev.upload(&dy)?, dev.upload(&g)?);
        let (gdx, gdg, gdb) = cu::conv_grad::batch_norm_backward(dev, &dyd, c, &gd, &gs)?;
        Ok(vec![
            Out("dx", dev.download(&gdx)?, dx),
            Out("dgamma", dev.download(&gdg)?, dg),
            Out("dbeta", dev.download(&gdb)?, db),
        ])
    });
    Case(
        "batch_norm_backward",
        format!("[{b}, {h}, {w}, {c}]"),
        "f32",
        F32_TOL,
        run,
    )
}

/// ReLU in place, and its backward from the ReLU's output; the reference is the CPU training
/// forward's ReLU, f32::max(v, 0).
pub fn relu(n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let mut x = randn(rng, n, 1.0);
        x[0] = 0.0;
        x[1] = -0.0;
        let y: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
        let dy = randn(rng, n, 1.0);
        let dx = cpu::conv_grad::relu_backward(&y, &dy);
        let mut xd = dev.upload(&x)?;
        cu::conv_grad::relu(dev, &mut xd)?;
        let (yd, dyd) = (dev.upload(&y)?, dev.upload(&dy)?);
        let gdx = cu::conv_grad::relu_backward(dev, &yd, &dyd)?;
        Ok(vec![
            Out("y", dev.download(&xd)?, y),
            Out("dx", dev.download(&gdx)?, dx),
        ])
    });
    Case("relu", format!("[{n}]"), "f32", 0.0, run)
}

/// Max-pool backward with ties: x drawn from a few integers (with `nans` NaNs), so that most
/// windows hold their maximum more than once and the first-maximum rule decides.
pub fn max_pool_backward(
    (b, h, w, c): (usize, usize, usize, usize),
    (k, s, p): (usize, usize, usize),
    nans: usize,
) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let mut x: Vec<f32> = randn(rng, b * h * w * c, 1.2)
            .iter()
            .map(|v| v.round())
            .collect();
        for _ in 0..nans {
            let i = (rng.uniform() * x.len() as f64) as usize % x.len();
            x[i] = f32::NAN;
        }
        let size = |n: usize| (n + 2 * p - k) / s + 1;
        let dy = randn(rng, b * size(h) * size(w) * c, 1.0);
        let want = cpu::conv_grad::max_pool_backward(&x, (b, h, w, c), (k, s, p), &dy);
        let (xd, dyd) = (dev.upload(&x)?, dev.upload(&dy)?);
        let dx = cu::conv_grad::max_pool_backward(dev, &xd, (b, h, w, c), (k, s, p), &dyd)?;
        Ok(vec![Out("dx", dev.download(&dx)?, want)])
    });
    Case(
        "max_pool_backward",
        format!("[{b}, {h}, {w}, {c}] {k}×{k}/{s} p{p} ties, {nans} NaN"),
        "f32",
        0.0,
        run,
    )
}

pub fn mean_hw_backward((b, h, w, c): (usize, usize, usize, usize)) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let dy = randn(rng, b * c, 1.0);
        let want = cpu::conv_grad::mean_hw_backward(&dy, (b, h, w, c));
        let dx = cu::conv_grad::mean_hw_backward(dev, &dev.upload(&dy)?, (b, h, w, c))?;
        Ok(vec![Out("dx", dev.download(&dx)?, want)])
    });
    Case(
        "mean_hw_backward",
        format!("[{b}, {h}, {w}, {c}]"),
        "f32",
        0.0,
        run,
    )
}

/// conv2d_backward of x [B, H, W, Cin] by `cv`; `chunk_bytes` Some runs it over chunks of at most
/// that many im2col bytes (at least one image each).
pub fn conv2d_backward(
    (b, h, w): (usize, usize, usize),
    cv: Conv,
    chunk_bytes: Option<usize>,
) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (ho, wo) = (cv.out_size(h), cv.out_size(w));
        let x = randn(rng, b * h * w * cv.cin, 1.0);
        let std = (2.0 / cv.patch_len() as f32).sqrt();
        let wt = randn(rng, cv.cout * cv.patch_len(), std);
        let dy = randn(rng, b * ho * wo * cv.cout, 1.0);
        let (dx, dw, _) = cpu::conv_grad::conv2d_backward(&x, (b, h, w), &wt, &cv, &dy);
        let (xd, wd, dyd) = (dev.upload(&x)?, dev.upload(&wt)?, dev.upload(&dy)?);
        let (gdx, gdw) = match chunk_bytes {
            None => cu::conv_grad::conv2d_backward(dev, &xd, (b, h, w), &wd, &cv, &dyd)?,
            Some(bytes) => {
                cu::conv_grad::conv2d_backward_chunked(dev, &xd, (b, h, w), &wd, &cv, &dyd, bytes)?
            }
        };
        Ok(vec![
            Out("dx", dev.download(&gdx)?, dx),
            Out("dw", dev.download(&gdw)?, dw),
        ])
    });
    Case(
        "conv2d_backward",
        format!(
            "B={b} {h}×{w} {}→{} {}×{}/{} p{}{}",
            cv.cin,
            cv.cout,
            cv.k,
            cv.k,
            cv.stride,
            cv.pad,
            chunk_bytes.map_or(String::new(), |n| format!(" chunks ≤ {n} B"))
        ),
        "f32",
        F32_SUM_TOL,
        run,
    )
}

/// Three SGD steps on the device against `train::mode::sgd_update` (MODE's momentum 0.9, weight
/// decay 1e-4, lr 0.5), the momentum buffer starting at zeros as on the CPU.
pub fn sgd_momentum(n: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let s = ModeSettings::preset("mode-t")?;
        let w0 = randn(rng, n, 0.1);
        let mut params = BTreeMap::from([("w".to_string(), Tensor::from_vec(&[n], w0.clone())?)]);
        let mut momentum = BTreeMap::new();
        let (mut wd, mut bufd) = (dev.upload(&w0)?, dev.zeros::<f32>(n)?);
        for _ in 0..3 {
            let g = randn(rng, n, 1.0);
            let gd = dev.upload(&g)?;
            cu::conv_grad::sgd_momentum(
                dev,
                &mut wd,
                &gd,
                &mut bufd,
                s.lr,
                s.momentum,
                s.weight_decay,
            )?;
            let grads = HashMap::from([("w".to_string(), g)]);
            sgd_update(&mut params, &mut momentum, &grads, s.lr, &s);
        }
        Ok(vec![
            Out("w", dev.download(&wd)?, params["w"].as_slice().to_vec()),
            Out("buf", dev.download(&bufd)?, momentum["w"].clone()),
        ])
    });
    Case("sgd_momentum", format!("[{n}] 3 steps"), "f32", 0.0, run)
}

/// Every launcher twice on the same inputs: the outputs must agree bit for bit (no atomics, fixed
/// summation orders). Reported as the number of differing values per output (want 0).
pub fn conv_grad_repeat() -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (b, h, w, c) = (2, 15, 15, 24);
        let cv = Conv {
            cin: c,
            cout: 16,
            k: 3,
            stride: 2,
            pad: 1,
        };
        let x = offset_map(rng, b * h * w, c);
        let (g, be) = (randn(rng, c, 1.0), randn(rng, c, 1.0));
        let wt = randn(rng, cv.cout * cv.patch_len(), 0.1);
        let (ho, wo) = (cv.out_size(h), cv.out_size(w));
        let dy = randn(rng, b * ho * wo * cv.cout, 1.0);
        let dyx = randn(rng, x.len(), 1.0);
        let xd = dev.upload(&x)?;
        let (gd, bd, wd, dyd, dyxd) = (
            dev.upload(&g)?,
            dev.upload(&be)?,
            dev.upload(&wt)?,
            dev.upload(&dy)?,
            dev.upload(&dyx)?,
        );
        let once = || -> Result<Vec<(&'static str, Vec<f32>)>> {
            let (mut rm, mut rv) = (dev.zeros::<f32>(c)?, dev.zeros::<f32>(c)?);
            let (y, saved) = cu::conv_grad::batch_norm_train(
                dev,
                &xd,
                c,
                (&gd, &bd),
                (&mut rm, &mut rv),
                0.1,
                1e-5,
            )?;
            let (bdx, bdg, bdb) = cu::conv_grad::batch_norm_backward(dev, &dyxd, c, &gd, &saved)?;
            let (cdx, cdw) = cu::conv_grad::conv2d_backward(dev, &xd, (b, h, w), &wd, &cv, &dyd)?;
            let pool = cu::conv_grad::max_pool_backward(dev, &xd, (b, h, w, c), (3, 2, 1), &{
                let n = b * 8 * 8 * c;
                dev.upload(&dyx[..n])?
            })?;
            Ok(vec![
                ("bn y", dev.download(&y)?),
                ("bn run_var", dev.download(&rv)?),
                ("bn dx", dev.download(&bdx)?),
                ("bn dgamma", dev.download(&bdg)?),
                ("bn dbeta", dev.download(&bdb)?),
                ("conv dx", dev.download(&cdx)?),
                ("conv dw", dev.download(&cdw)?),
                ("pool dx", dev.download(&pool)?),
            ])
        };
        let (first, second) = (once()?, once()?);
        let mut outs = Vec::new();
        for ((name, a), (_, b)) in first.iter().zip(&second) {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(u, v)| u.to_bits() != v.to_bits())
                .count();
            if differ > 0 {
                return Err(Error::Cuda(format!(
                    "{name}: {differ} values differ bitwise between two runs"
                )));
            }
            outs.push(Out(name, vec![differ as f32], vec![0.0]));
        }
        Ok(outs)
    });
    Case("conv_grad_repeat", "bitwise".into(), "f32", 0.0, run)
}

/// Each launcher given one buffer of the wrong length (or a shape that does not fit) must refuse
/// with an error naming it, before any launch. Reported as the number of refusals (want all).
pub fn conv_grad_refusals() -> Case {
    let run: Run = Box::new(move |dev, _rng| {
        let f = |n: usize| dev.zeros::<f32>(n);
        let cv = Conv {
            cin: 4,
            cout: 8,
            k: 3,
            stride: 1,
            pad: 1,
        };
        let saved = cu::conv_grad::BatchNormSaved {
            xhat: f(30)?,
            rstd: f(3)?,
        };
        let (mut rm, mut rv) = (f(3)?, f(2)?);
        let (mut w, mut buf) = (f(10)?, f(10)?);
        let results: Vec<(&str, Result<()>)> = vec![
            (
                "running var",
                cu::conv_grad::batch_norm_train(
                    dev,
                    &f(30)?,
                    3,
                    (&f(3)?, &f(3)?),
                    (&mut rm, &mut rv),
                    0.1,
                    1e-5,
                )
                .map(drop),
            ),
            (
                "whole rows",
                cu::conv_grad::batch_norm_backward(dev, &f(31)?, 3, &f(3)?, &saved).map(drop),
            ),
            (
                "dy",
                cu::conv_grad::relu_backward(dev, &f(5)?, &f(6)?).map(drop),
            ),
            (
                "max_pool_backward dy",
                cu::conv_grad::max_pool_backward(
                    dev,
                    &f(2 * 5 * 5 * 3)?,
                    (2, 5, 5, 3),
                    (3, 2, 1),
                    &f(2 * 9 * 3 + 1)?,
                )
                .map(drop),
            ),
            (
                "does not fit",
                cu::conv_grad::max_pool_backward(dev, &f(4)?, (1, 2, 2, 1), (5, 1, 0), &f(1)?)
                    .map(drop),
            ),
            (
                "mean_hw_backward dy",
                cu::conv_grad::mean_hw_backward(dev, &f(5)?, (2, 3, 3, 3)).map(drop),
            ),
            (
                "conv2d_backward weight",
                cu::conv_grad::conv2d_backward(
                    dev,
                    &f(2 * 6 * 6 * 4)?,
                    (2, 6, 6),
                    &f(8 * 9 * 4 - 1)?,
                    &cv,
                    &f(2 * 6 * 6 * 8)?,
                )
                .map(drop),
            ),
            (
                "sgd_momentum buffer",
                cu::conv_grad::sgd_momentum(dev, &mut w, &f(10)?, &mut f(9)?, 0.1, 0.9, 0.0),
            ),
            (
                "sgd_momentum gradient",
                cu::conv_grad::sgd_momentum(dev, &mut buf, &f(11)?, &mut f(10)?, 0.1, 0.9, 0.0),
            ),
        ];
        let mut refused = 0;
        for (want, r) in &results {
            match r {
                Err(e) if e.to_string().contains(want) && !e.to_string().contains('\n') => {
                    refused += 1
                }
                Err(e) => {
                    return Err(Error::Cuda(format!(
                        "a refusal that does not name {want:?}: {e}"
                    )))
                }
                Ok(()) => return Err(Error::Cuda(format!("accepted a bad {want}"))),
            }
        }
        Ok(vec![Out(
            "refused",
            vec![refused as f32],
            vec![results.len() as f32],
        )])
    });
    Case("conv_grad_refusals", "bad lengths".into(), "f32", 0.0, run)
}

fn geometry(cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Conv {
    Conv {
        cin,
        cout,
        k,
        stride,
        pad,
    }
}

/// The ResNet training kernels' cases, appended to the table.
pub fn cases() -> Vec<Case> {
    vec![
        batch_norm_train((2, 9, 7, 64)),
        batch_norm_train((3, 5, 5, 33)),
        batch_norm_train((1, 1, 2, 5)),
        batch_norm_train((2, 17, 17, 40)), // 578 rows: three chunks of 256
        batch_norm_backward((2, 9, 7, 64)),
        batch_norm_backward((3, 5, 5, 33)),
        batch_norm_backward((4, 1, 1, 7)),
        batch_norm_backward((2, 17, 17, 40)),
        relu(10_007),
        max_pool_backward((2, 17, 17, 16), (3, 2, 1), 0),
        max_pool_backward((2, 16, 15, 8), (3, 2, 1), 5),
        max_pool_backward((1, 9, 9, 5), (3, 1, 1), 0),
        max_pool_backward((2, 8, 8, 3), (2, 2, 0), 0),
        mean_hw_backward((3, 7, 7, 512)),
        mean_hw_backward((2, 5, 3, 10)),
        conv2d_backward((2, 33, 33), geometry(3, 16, 7, 2, 3), None),
        conv2d_backward((2, 14, 14), geometry(32, 32, 3, 1, 1), None),
        conv2d_backward((2, 15, 15), geometry(16, 24, 3, 2, 1), None),
        conv2d_backward((2, 15, 15), geometry(32, 64, 1, 2, 0), None),
        conv2d_backward((3, 7, 7), geometry(64, 128, 1, 1, 0), None),
        conv2d_backward((2, 9, 11), geometry(8, 16, 3, 1, 1), None),
        conv2d_backward((3, 9, 11), geometry(8, 16, 3, 2, 1), Some(1)),
        // Two images' rows (5·6 rows of 72 f32 each) per chunk: chunks of 2 and 1 images.
        conv2d_backward(
            (3, 9, 11),
            geometry(8, 16, 3, 2, 1),
            Some(2 * 5 * 6 * 72 * 4),
        ),
        sgd_momentum(10_007),
        conv_grad_repeat(),
        conv_grad_refusals(),
    ]
}
