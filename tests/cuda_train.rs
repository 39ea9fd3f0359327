//! The training tape on a CUDA device against the same tape on the CPU: one tape
//! (src/train/tape) over two executors of `TrainExec` (src/model/cpu_train.rs, cuda_train.rs).
//! The gradient table: for the tiny timm models (per-block and shared relative positions, plain
//! ViT), every parameter's gradient of a label-smoothed cross-entropy, CUDA against CPU, with
//! err = max |cuda − cpu| / max |cpu| per tensor: f32 within 1e-5, bf16 (GEMMs and attention at
//! bf16, f32 accumulation, as autocast) within 5e-2. Also: drop-path draws the same rows on both,
//! the masked-image-modelling forward (mask token, gathered rows), the input gradient ODIN uses,
//! and two CUDA runs give bit-identical gradients.
//!
//! Without a usable GPU they run on the CPU stand-in for CUDA (tests/common/cuda.rs).

#![cfg(feature = "cuda")]

mod common;

use common::fixture;
use std::collections::HashMap;
use std::sync::Arc;

use mood::backend::cuda::CudaDevice;
use mood::model::cuda_attention::Compute;
use mood::model::cuda_exec::CudaExec;
use mood::model::exec::Exec;
use mood::model::train_exec::TrainExec;
use mood::model::{VisionTransformer, VitConfig};
use mood::train::loss::cross_entropy;
use mood::train::tape::{Grads, Tape};
use mood::weights::WeightStore;
use mood::Tensor;

const MODELS: [(&str, &str); 3] = [
    ("test_tiny_beit", "tiny_beit"),
    ("test_tiny_beit_shared_relpos", "tiny_beit_shared_relpos"),
    ("test_tiny_vit", "tiny_vit"),
];

fn load(arch: &str, name: &str) -> (VitConfig, VisionTransformer, Tensor) {
    let cfg = VitConfig::preset(arch).unwrap();
    let store = WeightStore::open(&fixture(&format!("timm/{name}.safetensors"))).unwrap();
    let model = VisionTransformer::load(&cfg, &store).unwrap();
    let (shape, x) = mood::npy::read_f32(&fixture(&format!("timm/{name}_input.npy"))).unwrap();
    (cfg, model, Tensor::from_vec(&shape, x).unwrap())
}

/// Forward + CE(label smoothing 0.1) + backward on `tape`; the gradients on the host.
fn grads_on<E: TrainExec>(
    mut tape: Tape<E>,
    model: &VisionTransformer,
    x: &Tensor,
) -> HashMap<String, Vec<f32>> {
    let (_, logits) = model.forward_with(&mut tape, x).unwrap();
    let logits = logits.unwrap();
    let z = tape.to_host(&logits).unwrap();
    let labels: Vec<usize> = (0..z.shape()[0]).map(|i| (3 * i + 1) % 10).collect();
    let (_, dz) = cross_entropy(z.as_slice(), &labels, z.shape()[1], 0.1);
    let (grads, mut ex) = tape.backward_keep(vec![(logits, dz)]).unwrap();
    to_host(&mut ex, grads)
}

fn to_host<E: TrainExec>(ex: &mut E, g: Grads<E::Grad>) -> HashMap<String, Vec<f32>> {
    let mut out: HashMap<String, Vec<f32>> = g
        .params
        .iter()
        .map(|(k, v)| (k.clone(), ex.grad_to_host(v).unwrap()))
        .collect();
    if let Some(i) = g.input {
        out.insert("<input>".into(), ex.grad_to_host(&i).unwrap());
    }
    out
}

/// The worst per-tensor error of `got` against `want` (max |diff| / max |want|), and its name.
fn worst(got: &HashMap<String, Vec<f32>>, want: &HashMap<String, Vec<f32>>) -> (f32, String) {
    assert_eq!(
        {
            let mut k: Vec<_> = got.keys().collect();
            k.sort();
            k
        },
        {
            let mut k: Vec<_> = want.keys().collect();
            k.sort();
            k
        },
        "the CUDA and CPU tapes give gradients of different parameters"
    );
    let mut w = (0.0f32, String::new());
    for (k, b) in want {
        let a = &got[k];
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        let e = a
            .iter()
            .zip(b)
            .map(|(x, y)| {
                if x.is_finite() {
                    (x - y).abs()
                } else {
                    f32::INFINITY
                }
            })
            .fold(0.0f32, f32::max)
            / scale;
        if e > w.0 || !e.is_finite() {
            w = (e, k.clone());
        }
    }
    w
}

fn cuda_tape<T: Compute>(dev: &Arc<CudaDevice>, cfg: &VitConfig, arch: &str) -> Tape<CudaExec<T>>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    Tape::on(CudaExec::<T>::new(
        Arc::clone(dev),
        arch,
        cfg.embed_dim / cfg.num_heads,
    ))
}

#[test]
fn gradient_table_cuda_vs_cpu() {
    let Some(dev) = common::cuda::device("gradient_table_cuda_vs_cpu") else {
        return;
    };
    let dev = Arc::new(dev);
    let mut failures = Vec::new();
    for (arch, name) in MODELS {
        let (cfg, model, x) = load(arch, name);
        let cpu = grads_on(Tape::new(), &model, &x);
        let f32g = grads_on(cuda_tape::<f32>(&dev, &cfg, arch), &model, &x);
        let bf16g = grads_on(cuda_tape::<half::bf16>(&dev, &cfg, arch), &model, &x);
        for (prec, got, tol) in [("f32", &f32g, 1e-5f32), ("bf16", &bf16g, 5e-2)] {
            let (e, key) = worst(got, &cpu);
            let ok = e <= tol;
            println!(
                "{} {arch} {prec}: {} gradients, worst {e:.2e} of the tensor's max (`{key}`), tol {tol:.0e}",
                if ok { "PASS" } else { "FAIL" },
                cpu.len()
            );
            if !ok {
                failures.push(format!("{arch} {prec}"));
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn drop_path_mim_and_input_gradients_cuda_vs_cpu() {
    let Some(dev) = common::cuda::device("drop_path_mim_and_input_gradients_cuda_vs_cpu") else {
        return;
    };
    let dev = Arc::new(dev);
    let (arch, name) = MODELS[0];
    let (cfg, model, x) = load(arch, name);

    // Drop-path at 0.5 with one seed: both executors draw the same images.
    let mut cpu = Tape::new();
    cpu.set_drop_path(0.5, cfg.depth, 11);
    let mut gpu = cuda_tape::<f32>(&dev, &cfg, arch);
    gpu.set_drop_path(0.5, cfg.depth, 11);
    let (e, key) = worst(&grads_on(gpu, &model, &x), &grads_on(cpu, &model, &x));
    println!("drop-path 0.5: worst {e:.2e} (`{key}`)");
    assert!(e <= 1e-5, "drop-path gradients differ: {e} at {key}");

    // The input gradient (ODIN).
    let mut cpu = Tape::new();
    cpu.want_input_grad = true;
    let mut gpu = cuda_tape::<f32>(&dev, &cfg, arch);
    gpu.want_input_grad = true;
    let (e, key) = worst(&grads_on(gpu, &model, &x), &grads_on(cpu, &model, &x));
    println!("input gradient: worst {e:.2e} (`{key}`)");
    assert!(e <= 1e-5, "input gradients differ: {e} at {key}");

    // Masked image modelling: the mask token in, the masked rows out, a squared loss on them.
    let b = x.shape()[0];
    let g = cfg.grid().0 * cfg.grid().1;
    let mask: Vec<bool> = (0..b * g).map(|i| i % 3 == 0).collect();
    let cpu = mim_grads(Tape::new(), &model, &x, &mask);
    let gpu = mim_grads(cuda_tape::<f32>(&dev, &cfg, arch), &model, &x, &mask);
    let (e, key) = worst(&gpu, &cpu);
    println!("masked modelling: worst {e:.2e} (`{key}`)");
    assert!(e <= 1e-5, "MIM gradients differ: {e} at {key}");
}

fn mim_grads<E: TrainExec>(
    mut tape: Tape<E>,
    model: &VisionTransformer,
    x: &Tensor,
    mask: &[bool],
) -> HashMap<String, Vec<f32>> {
    let d = model.cfg.embed_dim;
    let token = mood::model::layers::Param {
        name: "mask_token".into(),
        value: Tensor::from_vec(&[d], (0..d).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap(),
    };
    let norm = model.fc_norm.clone().expect("BEiT has fc_norm");
    let tokens = model
        .forward_masked(&mut tape, x, mask, &token, &norm)
        .unwrap();
    let rows: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
    let picked = tape.gather_rows(&tokens, &rows).unwrap();
    let v = tape.to_host(&picked).unwrap();
    // loss = ½ Σ v², so dloss/dv = v.
    let dv = v.as_slice().to_vec();
    let (grads, mut ex) = tape.backward_keep(vec![(picked, dv)]).unwrap();
    to_host(&mut ex, grads)
}

#[test]
fn cuda_gradients_repeat_bit_for_bit() {
    let Some(dev) = common::cuda::device("cuda_gradients_repeat_bit_for_bit") else {
        return;
    };
    let dev = Arc::new(dev);
    let (arch, name) = MODELS[0];
    let (cfg, model, x) = load(arch, name);
    for run in ["f32", "bf16"] {
        let (a, b) = if run == "f32" {
            (
                grads_on(cuda_tape::<f32>(&dev, &cfg, arch), &model, &x),
                grads_on(cuda_tape::<f32>(&dev, &cfg, arch), &model, &x),
            )
        } else {
            (
                grads_on(cuda_tape::<half::bf16>(&dev, &cfg, arch), &model, &x),
                grads_on(cuda_tape::<half::bf16>(&dev, &cfg, arch), &model, &x),
            )
        };
        for (k, va) in &a {
            let same = va
                .iter()
                .zip(&b[k])
                .all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{run}: `{k}` differs between two identical runs");
        }
        println!("{run}: {} gradients identical in two runs", a.len());
    }
}
