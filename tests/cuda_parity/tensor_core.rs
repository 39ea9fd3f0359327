//! Case builder of tests/cuda_parity.rs for kernels/tensor_core.cu: one warp's mma.m16n8k16 from
//! ldmatrix fragments (plain and .trans) staged by cp.async, against a plain f64 matmul. A wrong
//! fragment layout (in the stand-in's tensor_core_sim.h or in the addressing that every
//! tensor-core kernel copies) puts products in the wrong cells: errors of order 1, not rounding.

use super::{cu, randn, rounded, up, Case, Out, Run, F32_SUM_TOL};
use half::bf16;

pub fn tensor_core_mma() -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let a = rounded::<bf16>(&randn(rng, 16 * 32, 1.0));
        let b = rounded::<bf16>(&randn(rng, 32 * 16, 1.0));
        // B n-major: bt[n][k] = b[k][n].
        let bt: Vec<f32> = (0..16 * 32).map(|e| b[(e % 32) * 16 + e / 32]).collect();
        let want: Vec<f32> = (0..256)
            .map(|e| {
                let (i, j) = (e / 16, e % 16);
                (0..32)
                    .map(|k| a[i * 32 + k] as f64 * b[k * 16 + j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let (ad, btd, bd) = (
            up::<bf16>(dev, &a)?,
            up::<bf16>(dev, &bt)?,
            up::<bf16>(dev, &b)?,
        );
        let (c1, c2) = cu::tensor_core::mma_bf16(dev, &ad, &btd, &bd)?;
        Ok(vec![
            Out("C (ldsm)", dev.download(&c1)?, want.clone()),
            Out("C (.trans)", dev.download(&c2)?, want),
        ])
    });
    Case(
        "tensor_core_mma",
        "A [16, 32] B [32, 16]".into(),
        "bf16",
        F32_SUM_TOL,
        run,
    )
}
