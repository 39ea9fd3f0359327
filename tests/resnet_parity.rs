//! timm's ResNets against mood's (src/model/resnet.rs) on tiny models with every parameter and
//! BatchNorm statistic randomised (tools/make_resnet_fixtures.py): BasicBlock and Bottleneck with
//! the ImageNet stem, and MODE's CIFAR stem. Features and logits within 1e-4 of the largest
//! value (the BatchNorm fold and the im2col GEMMs sum in another order than PyTorch).

mod common;

use common::fixture;
use mood::model::resnet::{ResNet, ResNetConfig};
use mood::weights::WeightStore;
use mood::Tensor;

fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f32::max)
}

#[test]
fn tiny_resnets_match_timm() {
    let mut failures = Vec::new();
    for name in [
        "tiny_resnet_basic",
        "tiny_resnet_bottleneck",
        "tiny_resnet_basic_cifar",
    ] {
        let cfg = ResNetConfig::preset(&format!("test_{name}")).unwrap();
        let store = WeightStore::open(&fixture(&format!("resnet/{name}.safetensors"))).unwrap();
        let model = ResNet::load(&cfg, &store).unwrap();
        let read = |what: &str| {
            mood::npy::read_f32(&fixture(&format!("resnet/{name}_{what}.npy"))).unwrap()
        };
        let (shape, x) = read("input");
        let (_, f) = read("features");
        let (_, l) = read("logits");
        let out = model
            .forward(&Tensor::from_vec(&shape, x).unwrap())
            .unwrap();
        let ef = rel(out.features.as_slice(), &f);
        let el = rel(out.logits.expect("fixture has fc").as_slice(), &l);
        let ok = ef <= 1e-4 && el <= 1e-4;
        println!(
            "{} {name}: max diff / max |value| vs timm: features {ef:.2e}, logits {el:.2e} (tol 1e-4)",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failures.push(name);
        }
    }
    assert!(
        failures.is_empty(),
        "ResNet differs from timm: {failures:?}"
    );
}

#[test]
fn a_missing_or_misshapen_tensor_is_named() {
    let cfg = ResNetConfig::preset("test_tiny_resnet_bottleneck").unwrap();
    // The BasicBlock checkpoint under the Bottleneck config: layer1.0.conv1 is 3×3, not 1×1.
    let store = WeightStore::open(&fixture("resnet/tiny_resnet_basic.safetensors")).unwrap();
    let e = ResNet::load(&cfg, &store)
        .err()
        .expect("wrong block type accepted")
        .to_string();
    assert!(e.contains("layer1.0.conv1.weight"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn the_parameter_list_is_timms_state_dict() {
    use mood::model::resnet::parameter_shapes;
    for name in [
        "tiny_resnet_basic",
        "tiny_resnet_bottleneck",
        "tiny_resnet_basic_cifar",
    ] {
        let cfg = ResNetConfig::preset(&format!("test_{name}")).unwrap();
        let store = WeightStore::open(&fixture(&format!("resnet/{name}.safetensors"))).unwrap();
        let mut timm: Vec<(String, Vec<usize>)> = store
            .names()
            .filter(|k| !k.ends_with("num_batches_tracked"))
            .map(|k| (k.clone(), store.shape_of(k).unwrap().to_vec()))
            .collect();
        let mut ours = parameter_shapes(&cfg);
        timm.sort();
        ours.sort();
        assert_eq!(ours, timm, "{name}");
    }
}

#[test]
fn resnet50_costs_what_torchvision_publishes() {
    use mood::model::resnet::{flops_per_image, random_store};
    // torchvision's model card for resnet50 (IMAGENET1K_V1): 4.09 GFLOPS counted as multiply-adds.
    let cfg = ResNetConfig::preset("resnet50").unwrap();
    let model = ResNet::load(&cfg, &random_store(&cfg, 0)).unwrap();
    let gmacs = flops_per_image(&model) / 2e9;
    assert!((gmacs - 4.09).abs() < 0.02, "{gmacs} GMACs");
    assert_eq!(cfg.feature_dim(), 2048);
}
