//! Case builders of tests/cuda_parity.rs for the convolutional nets' kernels (kernels/conv.cu,
//! kernels/groupnorm.cu), each against its CPU op (src/backend/cpu/conv.rs, groupnorm.rs) on
//! NHWC maps. Geometries are those of ResNet and BiT (7×7/2 stems, 3×3 same and strided, 1×1
//! strided shortcuts, 1×1 direct GEMMs), at odd sizes so that padding and tails are exercised.
//! Tolerances: the convolutions F32_SUM_TOL at f32 (the GEMM sums K products in another order)
//! and at bf16 too (operands rounded to bf16 on both sides, f32 accumulation and an f32 result,
//! so only the summation order differs);
//! max-pool and the layout change exact; mean_hw and GroupNorm F32_TOL (f32 sums on the device,
//! f64 on the CPU).

use super::{cpu, cu, randn, rounded, tol_for, up, Case, Out, Run, Storage, F32_SUM_TOL, F32_TOL};
use cpu::conv::{Conv, Epilogue, PoolPad};

/// conv2d of x [B, H, H, Cin] by `cv`, with a bias, a residual and ReLU as asked. x, the residual
/// and y are f32; T is the GEMM operand type (x's rows and the weight rounded to T: the CPU
/// reference takes the rounded values).
pub fn conv2d<T: Storage>(
    b: usize,
    h: usize,
    cv: Conv,
    (bias, residual, relu): (bool, bool, bool),
) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let ho = cv.out_size(h);
        let x = randn(rng, b * h * h * cv.cin, 1.0);
        let std = (2.0 / cv.patch_len() as f32).sqrt();
        let w = rounded::<T>(&randn(rng, cv.cout * cv.patch_len(), std));
        let bv = randn(rng, cv.cout, 0.5);
        let res = randn(rng, b * ho * ho * cv.cout, 1.0);
        let ep = Epilogue {
            bias: bias.then_some(&bv[..]),
            residual: residual.then_some(&res[..]),
            relu,
        };
        let want = cpu::conv::conv2d(&rounded::<T>(&x), (b, h, h), &w, &cv, &ep);
        let (xd, wd, bd, rd) = (
            dev.upload(&x)?,
            up::<T>(dev, &w)?,
            dev.upload(&bv)?,
            dev.upload(&res)?,
        );
        let y = cu::conv::conv2d(
            dev,
            &xd,
            (b, h, h),
            &wd,
            &cv,
            bias.then_some(&bd),
            residual.then_some(&rd),
            relu,
        )?;
        Ok(vec![Out("y", dev.download(&y)?, want)])
    });
    let epilogue = [(bias, "+b"), (residual, "+res"), (relu, " relu")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, s)| *s)
        .collect::<String>();
    Case(
        "conv2d",
        format!(
            "B={b} {h}² {}→{} {}×{}/{} p{}{epilogue}",
            cv.cin, cv.cout, cv.k, cv.k, cv.stride, cv.pad
        ),
        T::NAME,
        F32_SUM_TOL,
        run,
    )
}

pub fn max_pool<T: Storage>(b: usize, h: usize, c: usize, pad: PoolPad) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        // Mostly negative values, so that a padded tap read as 0 (or wrongly as 0) shows.
        let x: Vec<f32> = randn(rng, b * h * h * c, 1.0)
            .iter()
            .map(|v| v - 1.5)
            .collect();
        let x = rounded::<T>(&x);
        let want = match pad {
            PoolPad::NegInf => cpu::conv::max_pool(&x, (b, h, h, c), 3, 2, 1),
            PoolPad::Zero => {
                // The definition: pad with zeros, then an unpadded max-pool.
                let hp = h + 2;
                let mut padded = vec![0.0f32; b * hp * hp * c];
                for bi in 0..b {
                    for y in 0..h {
                        for xx in 0..h {
                            let src = ((bi * h + y) * h + xx) * c;
                            let dst = ((bi * hp + y + 1) * hp + xx + 1) * c;
                            padded[dst..dst + c].copy_from_slice(&x[src..src + c]);
                        }
                    }
                }
                cpu::conv::max_pool(&padded, (b, hp, hp, c), 3, 2, 0)
            }
        };
        let xd = up::<T>(dev, &x)?;
        let mut y = dev.zeros::<T>(want.len())?;
        cu::conv::max_pool(dev, &xd, &mut y, (b, h, h, c), (3, 2, 1), pad)?;
        let got = dev.download(&y)?.into_iter().map(T::to_f32).collect();
        Ok(vec![Out("y", got, want)])
    });
    Case(
        "max_pool",
        format!("[{b}, {h}, {h}, {c}] 3×3/2 p1 {pad:?}"),
        T::NAME,
        0.0,
        run,
    )
}

pub fn mean_hw<T: Storage>(b: usize, hw: usize, c: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x: Vec<f32> = randn(rng, b * hw * c, 1.0)
            .iter()
            .map(|v| v.abs())
            .collect();
        let x = rounded::<T>(&x);
        let want = cpu::conv::mean_hw(&x, (b, hw, 1, c));
        let xd = up::<T>(dev, &x)?;
        let mut y = dev.zeros::<f32>(b * c)?;
        cu::conv::mean_hw(dev, &xd, &mut y, (b, hw, c))?;
        Ok(vec![Out("y", dev.download(&y)?, want)])
    });
    Case(
        "mean_hw",
        format!("[{b}, {hw}, {c}]"),
        T::NAME,
        F32_TOL,
        run,
    )
}

pub fn nchw_to_nhwc<T: Storage>(b: usize, c: usize, h: usize, w: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x = rounded::<T>(&randn(rng, b * c * h * w, 1.0));
        let want = cpu::conv::nchw_to_nhwc(&x, b, c, h, w);
        let xd = dev.upload(&x)?;
        let mut y = dev.zeros::<T>(x.len())?;
        cu::conv::nchw_to_nhwc(dev, &xd, &mut y, (b, c, h, w))?;
        let got = dev.download(&y)?.into_iter().map(T::to_f32).collect();
        Ok(vec![Out("y", got, want)])
    });
    Case(
        "nchw_to_nhwc",
        format!("[{b}, {c}, {h}, {w}]"),
        T::NAME,
        0.0,
        run,
    )
}

pub fn group_norm<T: Storage>(b: usize, hw: usize, c: usize, groups: usize, relu: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        // A mean offset: the two-pass variance must not cancel.
        let x: Vec<f32> = randn(rng, b * hw * c, 2.0)
            .iter()
            .map(|v| v + 3.0)
            .collect();
        let x = rounded::<T>(&x);
        let (g, be) = (randn(rng, c, 1.0), randn(rng, c, 1.0));
        let want = cpu::groupnorm::group_norm(&x, (b, hw, c), groups, (&g, &be), 1e-5, relu);
        let (xd, gd, bd) = (up::<T>(dev, &x)?, dev.upload(&g)?, dev.upload(&be)?);
        let mut y = dev.zeros::<T>(x.len())?;
        cu::groupnorm::group_norm(dev, &xd, (&gd, &bd), &mut y, (b, hw, c), groups, 1e-5, relu)?;
        let got = dev.download(&y)?.into_iter().map(T::to_f32).collect();
        Ok(vec![Out("y", got, want)])
    });
    Case(
        "group_norm",
        format!(
            "[{b}, {hw}, {c}] G={groups}{}",
            if relu { " relu" } else { "" }
        ),
        T::NAME,
        tol_for::<T>(F32_TOL),
        run,
    )
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

/// The convolutional nets' cases, appended to the table.
pub fn cases() -> Vec<Case> {
    use half::bf16;
    let all = (true, true, true);
    vec![
        conv2d::<f32>(2, 33, geometry(3, 16, 7, 2, 3), (true, false, true)),
        conv2d::<f32>(2, 14, geometry(32, 32, 3, 1, 1), all),
        conv2d::<f32>(2, 15, geometry(16, 24, 3, 2, 1), (true, false, true)),
        conv2d::<f32>(2, 15, geometry(32, 64, 1, 2, 0), (true, false, false)),
        conv2d::<f32>(3, 7, geometry(64, 256, 1, 1, 0), all),
        conv2d::<f32>(2, 9, geometry(24, 40, 1, 1, 0), (false, true, false)),
        conv2d::<f32>(2, 9, geometry(8, 16, 3, 1, 1), (false, false, false)),
        conv2d::<bf16>(2, 33, geometry(3, 16, 7, 2, 3), (true, false, true)),
        conv2d::<bf16>(2, 14, geometry(32, 32, 3, 1, 1), all),
        conv2d::<bf16>(2, 15, geometry(16, 24, 3, 2, 1), (false, false, false)),
        conv2d::<bf16>(3, 7, geometry(64, 256, 1, 1, 0), all),
        max_pool::<f32>(2, 17, 16, PoolPad::NegInf),
        max_pool::<f32>(2, 16, 8, PoolPad::Zero),
        max_pool::<bf16>(2, 17, 16, PoolPad::NegInf),
        max_pool::<bf16>(1, 9, 8, PoolPad::Zero),
        mean_hw::<f32>(3, 49, 512),
        mean_hw::<bf16>(2, 225, 64),
        nchw_to_nhwc::<f32>(2, 3, 33, 31),
        nchw_to_nhwc::<bf16>(1, 3, 16, 17),
        group_norm::<f32>(2, 225, 64, 8, true),
        group_norm::<f32>(1, 49, 48, 4, false),
        group_norm::<bf16>(2, 225, 64, 8, true),
    ]
}
