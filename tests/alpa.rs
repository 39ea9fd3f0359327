//! MODE's ALPA loss against PyTorch autograd (tools/make_alpa_fixtures.py): similarity matrix,
//! loss, and the gradients of the six MLP weights and of the local features.

mod common;

use common::fixture;
use mood::train::alpa::{Alpa, WEIGHT_NAMES};
use mood::weights::WeightStore;

#[test]
fn alpa_loss_and_gradients_match_torch_autograd() {
    let (fs, f) = mood::npy::read_f32(&fixture("train/alpa_features.npy")).unwrap();
    let (_, labels) = mood::npy::read_f32(&fixture("train/alpa_labels.npy")).unwrap();
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let read64 = |name: &str| -> Vec<f64> {
        let bytes = std::fs::read(fixture(name)).unwrap();
        npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
    };
    let want_loss = read64("train/alpa_loss.npy")[0];
    let want_sim = read64("train/alpa_sim.npy");
    let w = WeightStore::open(&fixture("train/alpa_weights.safetensors")).unwrap();
    let g = WeightStore::open(&fixture("train/alpa_grads.safetensors")).unwrap();
    let get = |s: &WeightStore, n: &str| s.get(n, s.shape_of(n).unwrap()).unwrap().into_vec();
    let weights: Vec<Vec<f32>> = WEIGHT_NAMES.iter().map(|n| get(&w, n)).collect();
    let (t, dim) = (fs[1], fs[2]);
    let proj = w.shape_of("query.2").unwrap()[0];
    let alpa = Alpa {
        weights: std::array::from_fn(|i| &weights[i][..]),
        dim,
        proj,
        scale: 10.0,
    };
    let out = alpa.forward_backward(&f, &labels, t);
    assert!(
        (out.loss as f64 - want_loss).abs() < 1e-5 * want_loss.abs(),
        "loss {} vs {want_loss}",
        out.loss
    );
    for (a, b) in out.similarity.iter().zip(&want_sim) {
        assert!((*a as f64 - b).abs() < 1e-5, "similarity {a} vs {b}");
    }
    let check = |name: &str, ours: &[f32]| {
        let want = get(&g, name);
        let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-4 * scale,
            "{name}: max |diff| {worst} vs max |grad| {scale}"
        );
    };
    for (i, n) in WEIGHT_NAMES.iter().enumerate() {
        check(n, &out.d_weights[i]);
    }
    check("features", &out.d_features);
}
