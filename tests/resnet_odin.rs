//! ODIN through a ResNet (src/extract/odin_resnet.rs) against torch autograd in float64
//! (tools/make_resnet_odin_fixtures.py) on the tiny timm ResNets of tests/resnet_parity.rs: the
//! input gradient of CE(z/T, ŷ) within 1e-4 of its largest magnitude (BasicBlock and Bottleneck
//! with the max-pool stem, and MODE's CIFAR stem), and the perturbed images' scores.

mod common;

use mood::extract::odin_resnet;
use mood::model::resnet::{ResNet, ResNetConfig};
use mood::tensor::Tensor;
use mood::weights::WeightStore;

fn reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(common::fixture("resnet_train/odin.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn check(case: &str, arch: &str) {
    let store = WeightStore::open(&common::fixture(&format!("resnet/{case}.safetensors"))).unwrap();
    let model = ResNet::load(&ResNetConfig::preset(arch).unwrap(), &store).unwrap();
    let (shape, x) =
        mood::npy::read_f32(&common::fixture(&format!("resnet/{case}_input.npy"))).unwrap();
    let x = Tensor::from_vec(&shape, x).unwrap();
    for (t, eps) in [(1000.0f32, 0.0014f32), (1.0, 0.01)] {
        let g = odin_resnet::input_grad(&model, &x, t).unwrap();
        let want = reference(&format!("{case}.grad_T{t}"));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(
            err < 1e-4,
            "{case} T={t}: input gradient relative error {err:.2e}"
        );
        let s = odin_resnet::scores(&model, &x, t, eps).unwrap();
        let ws = reference(&format!("{case}.scores_T{t}"));
        let serr = s
            .iter()
            .zip(&ws)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(serr < 1e-5, "{case} T={t}: scores {s:?} vs torch {ws:?}");
        println!("{case} T={t}: gradient {err:.2e} relative, scores {serr:.2e} absolute");
    }
}

#[test]
fn basic_block_odin_matches_torch() {
    check("tiny_resnet_basic", "test_tiny_resnet_basic");
}

#[test]
fn bottleneck_odin_matches_torch() {
    check("tiny_resnet_bottleneck", "test_tiny_resnet_bottleneck");
}

#[test]
fn cifar_stem_odin_matches_torch() {
    check("tiny_resnet_basic_cifar", "test_tiny_resnet_basic_cifar");
}

#[test]
fn extract_writes_a_resnets_odin_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let w = common::fixture("resnet/tiny_resnet_basic_cifar.safetensors");
    let r = common::extract_arch(
        "test_tiny_resnet_basic_cifar",
        w.to_str().unwrap(),
        "digits:0-1@test",
        &out,
        &["--odin=1,0.01"],
        &[],
    );
    assert_eq!(r.0, 0, "{}", r.2);
    let (fs, _) = mood::npy::read_f32(&out.join("features.npy")).unwrap();
    let (os, odin) = mood::npy::read_f32(&out.join("odin.npy")).unwrap();
    assert_eq!(os, vec![fs[0]], "one ODIN score per image");
    // max softmax over 10 classes at T = 1: in [1/10, 1].
    assert!(odin.iter().all(|&s| (0.1 - 1e-6..=1.0 + 1e-6).contains(&s)));
}
