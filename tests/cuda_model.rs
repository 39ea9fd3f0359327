//! Whole-model CUDA forwards (src/model/cuda_vit.rs):
//!   - the timm fixtures (tiny BEiT with per-block and shared relative positions, tiny ViT; see
//!     tests/timm_parity.rs) through the f32 CUDA forward, at the CPU test's 1e-4 absolute;
//!   - BEiT-Base/16 with random weights, batch 2, CUDA f32 and bf16 (fused and cuBLAS attention)
//!     against the CPU forward, with rel = |gpu − cpu| / (|cpu| + rms(cpu)) as in
//!     tests/cuda_parity.rs: f32 within 1e-3
//!     (12 blocks of GEMMs summed in another order), bf16 within 1e-1 (bf16 activations between
//!     every op for 12 blocks; a loose bound that catches a wrong kernel, not a rounding budget).
//!
//! Without a usable GPU they run on the CPU stand-in for CUDA (tests/common/cuda.rs).

#![cfg(feature = "cuda")]

mod common;

use common::fixture;
use mood::model::cuda_vit::CudaVit;
use mood::model::{init, VisionTransformer, VitConfig};
use mood::weights::WeightStore;
use mood::Tensor;

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs() / (w.abs() + rms)
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

#[test]
fn timm_fixtures_through_cuda_f32() {
    let Some(dev) = common::cuda::device("timm_fixtures_through_cuda_f32") else {
        return;
    };
    let mut failures = Vec::new();
    for (arch, name) in [
        ("test_tiny_beit", "tiny_beit"),
        ("test_tiny_beit_shared_relpos", "tiny_beit_shared_relpos"),
        ("test_tiny_vit", "tiny_vit"),
    ] {
        let cfg = VitConfig::preset(arch).unwrap();
        let store = WeightStore::open(&fixture(&format!("timm/{name}.safetensors"))).unwrap();
        let model = VisionTransformer::load(&cfg, &store).unwrap();
        let (shape, x) = mood::npy::read_f32(&fixture(&format!("timm/{name}_input.npy"))).unwrap();
        let (_, f) = mood::npy::read_f32(&fixture(&format!("timm/{name}_features.npy"))).unwrap();
        let (_, l) = mood::npy::read_f32(&fixture(&format!("timm/{name}_logits.npy"))).unwrap();
        let gpu = CudaVit::<f32>::load(&dev, &model).unwrap();
        let out = gpu
            .forward(&dev, &Tensor::from_vec(&shape, x).unwrap())
            .unwrap();
        let ef = max_abs(out.features.as_slice(), &f);
        let el = max_abs(out.logits.expect("fixture has a head").as_slice(), &l);
        let ok = ef <= 1e-4 && el <= 1e-4;
        println!(
            "{} {arch}: max |diff| vs timm: features {ef:.2e}, logits {el:.2e} (tol 1e-4)",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failures.push(arch);
        }
    }
    assert!(
        failures.is_empty(),
        "CUDA f32 forward differs from timm: {failures:?}"
    );
}

#[test]
fn beit_base_cuda_matches_cpu() {
    let Some(dev) = common::cuda::device("beit_base_cuda_matches_cpu") else {
        return;
    };
    let cfg = VitConfig::preset("beit_base_patch16_224").unwrap();
    let model = VisionTransformer::load(&cfg, &init::random_store(&cfg, 0)).unwrap();
    let mut rng = init::Rng::new(7);
    let shape = [2, 3, cfg.img_size, cfg.img_size];
    let x: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.normal() as f32)
        .collect();
    let x = Tensor::from_vec(&shape, x).unwrap();
    let cpu = model.forward(&x).unwrap();
    let cpu_logits = cpu.logits.expect("preset has a head");
    let mut failures = Vec::new();
    let mut check = |what: &str, out: mood::model::Output, tol: f32| {
        let rf = max_rel(out.features.as_slice(), cpu.features.as_slice());
        let rl = max_rel(out.logits.unwrap().as_slice(), cpu_logits.as_slice());
        let ok = rf <= tol && rl <= tol;
        println!(
            "{} beit_base {what}: max rel vs CPU: features {rf:.2e}, logits {rl:.2e} (tol {tol:.0e})",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failures.push(what.to_string());
        }
    };
    let f32_model = CudaVit::<f32>::load(&dev, &model).unwrap();
    check("f32", f32_model.forward(&dev, &x).unwrap(), 1e-3);
    let mut bf16_model = CudaVit::<half::bf16>::load(&dev, &model).unwrap();
    bf16_model.attention_gemm = false;
    check(
        "bf16 fused attention",
        bf16_model.forward(&dev, &x).unwrap(),
        1e-1,
    );
    bf16_model.attention_gemm = true;
    check(
        "bf16 cuBLAS attention",
        bf16_model.forward(&dev, &x).unwrap(),
        1e-1,
    );
    assert!(
        failures.is_empty(),
        "CUDA forward differs from CPU: {failures:?}"
    );
}
