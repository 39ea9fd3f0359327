//! ResNets in training mode (src/model/resnet_train.rs) and MODE's SupCon loss
//! (src/train/supcon.rs) against torch autograd in float64 (tools/make_resnet_train_fixtures.py):
//! timm's ResNet with BatchNorm on batch statistics, a BasicBlock net with MODE's CIFAR stem and a
//! Bottleneck net with the ImageNet stem (max-pool), random parameters and running statistics, a
//! loss that reaches the network through both the last map and the pooled features. Every
//! parameter gradient, the input gradient, the map and the updated running statistics must agree
//! within 1e-4 of the reference tensor's largest magnitude.

mod common;

use std::collections::BTreeMap;

use mood::model::resnet::{BlockKind, ResNetConfig};
use mood::model::resnet_train::ResNetTrain;
use mood::tensor::Tensor;
use mood::train::supcon::{SupCon, HEAD_NAMES};

use common::SafetensorsFixture as Fixture;

impl Fixture {
    fn open() -> Fixture {
        Fixture::read("resnet_train/resnet_train.safetensors")
    }

    fn tensor(&self, name: &str) -> Tensor {
        let (s, v) = self.get(name);
        Tensor::from_vec(&s, v).unwrap()
    }

    /// Every tensor under `prefix`, by the rest of its name.
    fn under(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        self.st()
            .names()
            .into_iter()
            .filter_map(|n| {
                n.strip_prefix(prefix)
                    .map(|k| (k.to_string(), n.to_string()))
            })
            .map(|(k, n)| (k, self.tensor(&n)))
            .collect()
    }
}

/// max |got − want| / max |want|, asserted below `tol`.
fn assert_rel(got: &[f32], want: &[f32], tol: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:e}");
    err
}

fn nchw_to_nhwc(t: &Tensor) -> Vec<f32> {
    let s = t.shape();
    mood::backend::cpu::conv::nchw_to_nhwc(t.as_slice(), s[0], s[1], s[2], s[3])
}

fn check_case(fx: &Fixture, case: &str) {
    let (_, c) = fx.get(&format!("{case}.cfg"));
    let u = |i: usize| c[i] as usize;
    let cfg = ResNetConfig {
        name: format!("fixture_{case}"),
        block: if c[0] > 0.5 {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        },
        layers: [u(3), u(4), u(5), u(6)],
        channels: [u(7), u(8), u(9), u(10)],
        stem_width: u(2),
        cifar_stem: c[1] > 0.5,
        img_size: u(11),
        in_chans: 3,
        num_classes: 0,
    };
    let params = fx.under(&format!("{case}.p."));
    let net = ResNetTrain::new(&cfg);
    let input = fx.tensor(&format!("{case}.input"));
    let fw = net.forward(&params, &input).unwrap();
    let map = fx.tensor(&format!("{case}.map"));
    let e = assert_rel(&fw.map, &nchw_to_nhwc(&map), 1e-4, "map");
    println!("{case}: map {e:.2e}");
    let r_map = nchw_to_nhwc(&fx.tensor(&format!("{case}.r_map")));
    let (_, r_feat) = fx.get(&format!("{case}.r_feat"));
    let grads = net
        .backward(&params, &fw, Some(&r_map), Some(&r_feat))
        .unwrap();
    let want = fx.under(&format!("{case}.g."));
    assert_eq!(grads.params.len(), want.len(), "one gradient per parameter");
    let mut worst = (0f32, String::new());
    for (name, w) in &want {
        let g = grads
            .params
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = assert_rel(g, w.as_slice(), 1e-4, name);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    println!(
        "{case}: worst parameter gradient {:.2e} ({})",
        worst.0, worst.1
    );
    let (_, dinput) = fx.get(&format!("{case}.dinput"));
    let e = assert_rel(&grads.images, &dinput, 1e-4, "d input");
    println!("{case}: input gradient {e:.2e}");
    let running = fx.under(&format!("{case}.run."));
    assert_eq!(fw.running.len(), running.len(), "every running statistic");
    for (name, v) in &fw.running {
        assert_rel(v, running[name].as_slice(), 1e-5, name);
    }
}

#[test]
fn basic_block_cifar_gradients_match_torch() {
    check_case(&Fixture::open(), "basic_cifar");
}

#[test]
fn bottleneck_with_max_pool_gradients_match_torch() {
    check_case(&Fixture::open(), "bottleneck");
}

#[test]
fn supcon_loss_and_gradients_match_torch() {
    let fx = Fixture::open();
    let (fs, feats) = fx.get("supcon.features");
    let (_, labels) = fx.get("supcon.labels");
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let head: Vec<Tensor> = HEAD_NAMES
        .iter()
        .map(|n| fx.tensor(&format!("supcon.{n}")))
        .collect();
    let proj = head[2].shape()[0];
    let out = SupCon::default().forward_backward(
        [
            head[0].as_slice(),
            head[1].as_slice(),
            head[2].as_slice(),
            head[3].as_slice(),
        ],
        &feats,
        &labels,
        (fs[1], proj),
    );
    let (_, loss) = fx.get("supcon.loss");
    assert!(
        (out.loss - loss[0]).abs() <= 1e-5 * loss[0].abs().max(1.0),
        "loss {} vs torch {}",
        out.loss,
        loss[0]
    );
    let (_, df) = fx.get("supcon.d_features");
    let e = assert_rel(&out.d_features, &df, 1e-4, "d features");
    println!(
        "supcon: loss {} vs {}, d features {e:.2e}",
        out.loss, loss[0]
    );
    for (n, g) in HEAD_NAMES.iter().zip(&out.d_head) {
        let (_, want) = fx.get(&format!("supcon.d_{n}"));
        let e = assert_rel(g, &want, 1e-4, n);
        println!("supcon: d {n} {e:.2e}");
    }
}
