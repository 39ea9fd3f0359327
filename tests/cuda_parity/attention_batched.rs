//! Case builder of tests/cuda_parity.rs for the cuBLAS attention over the whole batch at once
//! (`attention::forward_batched` at f32 and bf16: head split/merge kernels around one strided-batched
//! GEMM per product over images × heads) against the CPU op, for any head dim.

use super::{cpu, cu, randn, rounded, tol_for, up, Case, Out, Run, Storage, F32_SUM_TOL};
use half::bf16;

pub fn attention_batched<T: Storage>(b: usize, n: usize, h: usize, dh: usize, bias: bool) -> Case {
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
        let got = if T::NAME == "f32" {
            let (qd, mut o) = (dev.upload(&qkv)?, dev.zeros::<f32>(b * n * d)?);
            let mut ws = cu::attention::BatchedScratch::new(dev, &gd)?;
            cu::attention::forward_batched(dev, &qd, bias_d, &mut o, &gd, scale, &mut ws)?;
            dev.download(&o)?
        } else {
            let (qd, mut o) = (up::<bf16>(dev, &qkv)?, dev.zeros::<bf16>(b * n * d)?);
            let mut ws = cu::attention::BatchedScratch::new(dev, &gd)?;
            cu::attention::forward_batched(dev, &qd, bias_d, &mut o, &gd, scale, &mut ws)?;
            dev.download(&o)?.into_iter().map(bf16::to_f32).collect()
        };
        Ok(vec![Out("out", got, want)])
    });
    let shape = format!(
        "B={b} N={n} H={h} Dh={dh} batched{}",
        if bias { " +bias" } else { "" }
    );
    Case(
        "attention_batched",
        shape,
        T::NAME,
        tol_for::<T>(F32_SUM_TOL),
        run,
    )
}
