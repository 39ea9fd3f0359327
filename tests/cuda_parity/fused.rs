//! Case builders of tests/cuda_parity.rs for the fused pre-norm kernels of kernels/layernorm.cu,
//! each against the CPU ops it replaces, run one after the other: the LayerNorm of the f32
//! residual written as bf16 (cast + LayerNorm), and residual + layer scale + the next LayerNorm
//! (with the saved mean and rstd against f64 ones).

use super::{cpu, cu, randn, rounded, tol_for, up, Case, Out, Run, Storage, F32_TOL};

pub fn layernorm_from_f32<T: Storage>(m: usize, d: usize) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        // A large mean offset: the two-pass variance must not cancel.
        let x: Vec<f32> = randn(rng, m * d, 1.0).iter().map(|v| v + 3.0).collect();
        let (g, b) = (randn(rng, d, 1.0), randn(rng, d, 1.0));
        let mut want = vec![0.0; m * d];
        cpu::layernorm::forward(&x, &g, &b, 1e-6, &mut want);
        let (xd, gd, bd) = (dev.upload(&x)?, dev.upload(&g)?, dev.upload(&b)?);
        let mut y = dev.zeros::<T>(m * d)?;
        cu::layernorm::forward_from_f32(dev, &xd, &gd, &bd, &mut y, None, (m, d), 1e-6)?;
        let got = dev.download(&y)?.into_iter().map(T::to_f32).collect();
        Ok(vec![Out("y", got, want)])
    });
    Case(
        "layernorm_from_f32",
        format!("[{m}, {d}]"),
        T::NAME,
        tol_for::<T>(F32_TOL),
        run,
    )
}

pub fn residual_layernorm<T: Storage>(m: usize, d: usize, layer_scale: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let x: Vec<f32> = randn(rng, m * d, 1.0).iter().map(|v| v + 2.0).collect();
        let y = rounded::<T>(&randn(rng, m * d, 1.0));
        let ls = randn(rng, d, 0.1);
        let (g, b) = (randn(rng, d, 1.0), randn(rng, d, 1.0));
        let mut x_want = x.clone();
        cpu::elementwise::residual_scaled(&mut x_want, &y, layer_scale.then_some(&ls[..]), d);
        let mut h_want = vec![0.0; m * d];
        cpu::layernorm::forward(&x_want, &g, &b, 1e-6, &mut h_want);
        let (mut mean_want, mut rstd_want) = (Vec::new(), Vec::new());
        for row in x_want.chunks_exact(d) {
            let mu = row.iter().map(|v| *v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (*v as f64 - mu).powi(2)).sum::<f64>() / d as f64;
            mean_want.push(mu as f32);
            rstd_want.push((1.0 / (var + 1e-6).sqrt()) as f32);
        }

        let (mut xd, yd, lsd) = (dev.upload(&x)?, up::<T>(dev, &y)?, dev.upload(&ls)?);
        let (gd, bd) = (dev.upload(&g)?, dev.upload(&b)?);
        let mut h = dev.zeros::<T>(m * d)?;
        let (mut mu, mut rs) = (dev.zeros::<f32>(m)?, dev.zeros::<f32>(m)?);
        cu::layernorm::residual_forward(
            dev,
            &mut xd,
            &yd,
            layer_scale.then_some(&lsd),
            (&gd, &bd),
            &mut h,
            Some((&mut mu, &mut rs)),
            (m, d),
            1e-6,
        )?;
        let got = dev.download(&h)?.into_iter().map(T::to_f32).collect();
        Ok(vec![
            Out("x", dev.download(&xd)?, x_want),
            Out("h", got, h_want),
            Out("mean", dev.download(&mu)?, mean_want),
            Out("rstd", dev.download(&rs)?, rstd_want),
        ])
    });
    let op = "residual_layernorm";
    let shape = format!("[{m}, {d}]{}", if layer_scale { " +ls" } else { "" });
    Case(op, shape, T::NAME, tol_for::<T>(F32_TOL), run)
}
