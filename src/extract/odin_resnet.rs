//! ODIN (SPEC D4; see odin.rs for the transformers) through a ResNet on the CPU: the inference
//! network (BatchNorm folded, as resnet.rs runs it) forward with its activations kept, then back
//! from L = CE(z/T, ŷ) to the input with conv_grad's ops (the convolutions' input gradient by
//! col2im, ReLU, max-pool with PyTorch's first-maximum rule, global average pooling, the fc),
//! x' = x − ε·sign(∂L/∂x) (a zero gradient counts as +), score = max softmax(z(x')/T).

use crate::backend::cpu::conv::{self, Epilogue};
use crate::backend::cpu::conv_grad;
use crate::error::{Error, Result};
use crate::model::conv_exec::{image_dims, window_out, Nhwc};
use crate::model::resnet::{FoldedConv, ResNet};
use crate::tensor::Tensor;

/// A convolution's input and its shape, for the input gradient.
struct Kept<'m> {
    conv: &'m FoldedConv,
    x: Vec<f32>,
    dims: Nhwc,
}

fn conv_forward<'m>(
    c: &'m FoldedConv,
    x: &[f32],
    d: Nhwc,
    residual: Option<&[f32]>,
    relu: bool,
) -> Result<(Vec<f32>, Nhwc, Kept<'m>)> {
    let out = window_out(d, c.cv.cout, (c.cv.k, c.cv.stride, c.cv.pad));
    if d.c != c.cv.cin || out.is_empty() {
        return Err(Error::Data(format!("{}: cannot take a map {d:?}", c.name)));
    }
    let ep = Epilogue {
        bias: Some(&c.b),
        residual,
        relu,
    };
    let y = conv::conv2d(x, (d.b, d.h, d.w), &c.w, &c.cv, &ep);
    let kept = Kept {
        conv: c,
        x: x.to_vec(),
        dims: d,
    };
    Ok((y, out, kept))
}

fn conv_input_grad(k: &Kept, dy: &[f32]) -> Vec<f32> {
    let d = k.dims;
    conv_grad::conv2d_backward(&k.x, (d.b, d.h, d.w), &k.conv.w, &k.conv.cv, dy).0
}

fn softmax_t(row: &[f32], t: f32) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = row
        .iter()
        .map(|&z| ((z as f64 - m) / t as f64).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// ∂L/∂images [B, C, H, W] of L = Σ_b CE(z_b/T, argmax z_b) (the batch's sum: only signs are used).
pub fn input_grad(model: &ResNet, images: &Tensor, temperature: f32) -> Result<Vec<f32>> {
    let (fw, fb) = model
        .fc
        .as_ref()
        .ok_or_else(|| Error::Usage("ODIN needs a classification head (`fc`)".into()))?;
    let d = image_dims(images, model.cfg.in_chans, &model.cfg.name)?;
    let x0 = conv::nchw_to_nhwc(images.as_slice(), d.b, d.c, d.h, d.w);
    let (stem_out, sd, stem) = conv_forward(&model.stem, &x0, d, None, true)?;
    let (mut x, mut dims) = if model.cfg.cifar_stem {
        (stem_out.clone(), sd)
    } else {
        let p = conv::max_pool(&stem_out, (sd.b, sd.h, sd.w, sd.c), 3, 2, 1);
        (p, window_out(sd, sd.c, (3, 2, 1)))
    };
    // Per block: the downsample's kept input, each convolution's, and each ReLU's output.
    let mut tape = Vec::with_capacity(model.blocks.len());
    for blk in &model.blocks {
        let (short, ds) = match &blk.downsample {
            Some(c) => {
                let (s, _, k) = conv_forward(c, &x, dims, None, false)?;
                (s, Some(k))
            }
            None => (x.clone(), None),
        };
        let last = blk.convs.len() - 1;
        let (mut h, mut hd) = (x, dims);
        let mut kept = Vec::new();
        let mut outs = Vec::new();
        for (j, c) in blk.convs.iter().enumerate() {
            let res = (j == last).then_some(short.as_slice());
            let (y, yd, k) = conv_forward(c, &h, hd, res, true)?;
            kept.push(k);
            outs.push(y.clone());
            (h, hd) = (y, yd);
        }
        tape.push((ds, kept, outs));
        (x, dims) = (h, hd);
    }
    let (b, f) = (dims.b, dims.c);
    let out = crate::model::resnet::pool_and_classify(&x, b, f, model.fc.as_ref())?;
    let z = out.logits.expect("a head was given");
    let c = fb.numel();
    // ∂L/∂z = (softmax(z/T) − onehot(ŷ))/T, then through the fc and the pooling.
    let mut dfeat = vec![0.0f32; b * f];
    for (row, df) in z.as_slice().chunks(c).zip(dfeat.chunks_exact_mut(f)) {
        let p = softmax_t(row, temperature);
        let yhat = (0..c)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        for (k, pk) in p.iter().enumerate() {
            let dz = ((pk - f64::from(u8::from(k == yhat))) / temperature as f64) as f32;
            df.iter_mut()
                .zip(&fw.as_slice()[k * f..][..f])
                .for_each(|(a, w)| *a += dz * w);
        }
    }
    let mut g = conv_grad::mean_hw_backward(&dfeat, (b, dims.h, dims.w, f));
    for (ds, kept, outs) in tape.iter().rev() {
        let last = kept.len() - 1;
        // Through the final ReLU: ∂L/∂(branch + shortcut) feeds both.
        let g_sum = conv_grad::relu_backward(&outs[last], &g);
        let mut gm = conv_input_grad(&kept[last], &g_sum);
        for j in (0..last).rev() {
            gm = conv_grad::relu_backward(&outs[j], &gm);
            gm = conv_input_grad(&kept[j], &gm);
        }
        let gs = match ds {
            Some(k) => conv_input_grad(k, &g_sum),
            None => g_sum,
        };
        gm.iter_mut().zip(&gs).for_each(|(a, s)| *a += s);
        g = gm;
    }
    if !model.cfg.cifar_stem {
        g = conv_grad::max_pool_backward(&stem_out, (sd.b, sd.h, sd.w, sd.c), (3, 2, 1), &g);
    }
    let g = conv_grad::relu_backward(&stem_out, &g);
    let dx = conv_input_grad(&stem, &g);
    let mut out = vec![0.0f32; dx.len()];
    for bi in 0..d.b {
        for y in 0..d.h {
            for xx in 0..d.w {
                for ch in 0..d.c {
                    out[((bi * d.c + ch) * d.h + y) * d.w + xx] =
                        dx[((bi * d.h + y) * d.w + xx) * d.c + ch];
                }
            }
        }
    }
    Ok(out)
}

/// ODIN scores of normalised images [B, C, H, W] (higher = more in-distribution).
pub fn scores(model: &ResNet, images: &Tensor, temperature: f32, epsilon: f32) -> Result<Vec<f32>> {
    if !temperature.is_finite() || temperature <= 0.0 || !epsilon.is_finite() || epsilon < 0.0 {
        return Err(Error::Usage(format!(
            "ODIN needs temperature > 0 and epsilon >= 0, got T = {temperature}, eps = {epsilon}"
        )));
    }
    let gx = input_grad(model, images, temperature)?;
    let mut x2 = images.clone();
    for (v, g) in x2.as_mut_slice().iter_mut().zip(&gx) {
        *v -= epsilon * if *g >= 0.0 { 1.0 } else { -1.0 };
    }
    let z = model
        .forward(&x2)?
        .logits
        .ok_or_else(|| Error::Usage("ODIN needs a classification head (`fc`)".into()))?;
    let c = z.shape()[1];
    Ok(z.as_slice()
        .chunks(c)
        .map(|row| {
            softmax_t(row, temperature)
                .into_iter()
                .fold(0.0f64, f64::max) as f32
        })
        .collect())
}
