//! Case builders of tests/cuda_parity.rs for kernels/flash_attention.cu (FlashAttention-2 style
//! attention on tensor cores) against the CPU op on the same bf16-rounded qkv: the output, and
//! the row log-sum-exp against an f64 one. Shapes: N = 5 and 17 (one partial key tile), 197 and
//! 257 (the ViT/BEiT sequence lengths: full tiles plus a masked tail), batch 1 and 3, with and
//! without BEiT's relative-position bias, few heads (the stand-in runs every thread as a fiber).

use super::{cpu, cu, randn, rounded, up, Case, Out, Run, HALF_TOL};
use half::bf16;

/// log Σ_j exp(scale·q_i·k_j + bias_ij) per (image, head, row), in f64: [B, H, N].
fn lse_ref(qkv: &[f32], bias: Option<&[f32]>, (b, n, h): (usize, usize, usize)) -> Vec<f32> {
    let (dh, d) = (64, h * 64);
    let scale = (dh as f64).powf(-0.5);
    let mut out = Vec::with_capacity(b * h * n);
    for img in 0..b {
        for head in 0..h {
            for i in 0..n {
                let q = &qkv[(img * n + i) * 3 * d + head * dh..][..dh];
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let k = &qkv[(img * n + j) * 3 * d + d + head * dh..][..dh];
                        let dot: f64 = q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum();
                        dot * scale + bias.map_or(0.0, |bb| bb[(head * n + i) * n + j] as f64)
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push((mx + s.iter().map(|v| (v - mx).exp()).sum::<f64>().ln()) as f32);
            }
        }
    }
    out
}

pub fn flash_attention(b: usize, n: usize, h: usize, bias: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (dh, d) = (64, h * 64);
        let qkv = rounded::<bf16>(&randn(rng, b * n * 3 * d, 1.0));
        let rel = randn(rng, h * n * n, 0.5);
        let dims = cpu::attention::Dims { b, n, h, dh };
        let mut want = vec![0.0; b * n * d];
        cpu::attention::forward(&qkv, bias.then_some(&rel[..]), &dims, &mut want);
        let lse_want = lse_ref(&qkv, bias.then_some(&rel[..]), (b, n, h));
        let rd = dev.upload(&rel)?;
        let (qd, mut o) = (up::<bf16>(dev, &qkv)?, dev.zeros::<bf16>(b * n * d)?);
        let mut lse = dev.zeros::<f32>(b * h * n)?;
        let gd = cu::attention::Dims { b, n, h, dh };
        let scale = (dh as f32).powf(-0.5);
        cu::flash_attention::forward(
            dev,
            &qd,
            bias.then_some(&rd),
            &mut o,
            Some(&mut lse),
            &gd,
            scale,
        )?;
        let got: Vec<f32> = dev.download(&o)?.into_iter().map(bf16::to_f32).collect();
        Ok(vec![
            Out("out", got, want),
            Out("lse", dev.download(&lse)?, lse_want),
        ])
    });
    let shape = format!(
        "B={b} N={n} H={h} Dh=64{}",
        if bias { " +bias" } else { "" }
    );
    Case("flash_attention", shape, "bf16", HALF_TOL, run)
}

/// The backward (from the GPU forward's out and lse) against the CPU backward (from its P):
/// dqkv, and dbias summed over the batch when the forward had a bias. B = 6 spans two groups of
/// images (IMAGES_PER_GROUP = 4), so the dbias partials and their reduction run too.
pub fn flash_attention_bwd(b: usize, n: usize, h: usize, bias: bool) -> Case {
    let run: Run = Box::new(move |dev, rng| {
        let (dh, d) = (64, h * 64);
        let qkv = rounded::<bf16>(&randn(rng, b * n * 3 * d, 1.0));
        let dout = rounded::<bf16>(&randn(rng, b * n * d, 1.0));
        let rel = randn(rng, h * n * n, 0.5);
        let dims = cpu::attention::Dims { b, n, h, dh };
        let mut o = vec![0.0; b * n * d];
        let probs =
            cpu::attention::forward_keep_probs(&qkv, bias.then_some(&rel[..]), &dims, &mut o);
        let (dqkv_want, dbias_want) = cpu::attention::backward(&qkv, &probs, bias, &dims, &dout);

        let gd = cu::attention::Dims { b, n, h, dh };
        let scale = (dh as f32).powf(-0.5);
        let (rd, qd, dod) = (
            dev.upload(&rel)?,
            up::<bf16>(dev, &qkv)?,
            up::<bf16>(dev, &dout)?,
        );
        let bias_d = bias.then_some(&rd);
        let (mut od, mut lse) = (dev.zeros::<bf16>(b * n * d)?, dev.zeros::<f32>(b * h * n)?);
        cu::flash_attention::forward(dev, &qd, bias_d, &mut od, Some(&mut lse), &gd, scale)?;
        let mut ws = cu::flash_attention::Workspace::new(dev, &gd, bias)?;
        let (mut dqkv, mut dbias) = (
            dev.zeros::<f32>(b * n * 3 * d)?,
            dev.zeros::<f32>(h * n * n)?,
        );
        let saved = cu::flash_attention::Saved {
            qkv: &qd,
            bias: bias_d,
            out: &od,
            lse: &lse,
        };
        let grads = cu::flash_attention::Grads {
            dqkv: &mut dqkv,
            dbias: bias.then_some(&mut dbias),
        };
        cu::flash_attention::backward(dev, &saved, &dod, grads, &mut ws, &gd, scale)?;
        let mut outs = vec![Out("dqkv", dev.download(&dqkv)?, dqkv_want)];
        if let Some(want) = dbias_want {
            outs.push(Out("dbias", dev.download(&dbias)?, want));
        }
        Ok(outs)
    });
    let shape = format!(
        "B={b} N={n} H={h} Dh=64{}",
        if bias { " +bias" } else { "" }
    );
    Case("flash_attention_bwd", shape, "bf16", HALF_TOL, run)
}

/// This group's rows of the table: few heads (the stand-in runs every thread as a fiber), then
/// BEiT-B's 12 heads once each way.
pub fn cases() -> Vec<Case> {
    vec![
        flash_attention(1, 5, 2, true),
        flash_attention(3, 5, 2, false),
        flash_attention(1, 17, 2, false),
        flash_attention(3, 17, 2, true),
        flash_attention(1, 197, 2, true),
        flash_attention(3, 197, 2, false),
        flash_attention(3, 197, 2, true),
        flash_attention(1, 257, 2, false),
        flash_attention(3, 257, 2, true),
        flash_attention(2, 197, 12, true), // BEiT-B's 12 heads: columns h·64 of 2304
        flash_attention_bwd(1, 5, 2, true),
        flash_attention_bwd(3, 5, 2, false),
        flash_attention_bwd(1, 17, 2, false),
        flash_attention_bwd(3, 17, 2, true),
        flash_attention_bwd(6, 17, 2, true),
        flash_attention_bwd(1, 197, 2, true),
        flash_attention_bwd(3, 197, 2, false),
        flash_attention_bwd(3, 197, 2, true),
        flash_attention_bwd(1, 257, 2, false),
        flash_attention_bwd(3, 257, 2, true),
        flash_attention_bwd(2, 17, 12, true),
    ]
}
