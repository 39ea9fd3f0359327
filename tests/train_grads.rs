//! Whole-model gradients through the tape against PyTorch: the tiny timm models of the parity
//! fixtures, cross-entropy (label smoothing 0.1) on their bundled input, every parameter gradient
//! compared with torch's (tools/make_train_fixtures.py). Tolerance: 1e-4 relative to the largest
//! gradient of each tensor, plus 1e-6 absolute.

mod common;

use common::fixture;
use mood::model::exec::Exec;
use mood::model::{VisionTransformer, VitConfig};
use mood::train::loss::cross_entropy;
use mood::train::tape::Tape;
use mood::weights::WeightStore;
use mood::Tensor;

fn check(arch: &str, name: &str) {
    let cfg = VitConfig::preset(arch).unwrap();
    let store = WeightStore::open(&fixture(&format!("timm/{name}.safetensors"))).unwrap();
    let model = VisionTransformer::load(&cfg, &store).unwrap();
    let (shape, x) = mood::npy::read_f32(&fixture(&format!("timm/{name}_input.npy"))).unwrap();
    let mut tape = Tape::new();
    let (_, logits) = model
        .forward_with(&mut tape, &Tensor::from_vec(&shape, x).unwrap())
        .unwrap();
    let logits = logits.unwrap();
    let (loss, dlogits) = cross_entropy(tape.value(&logits).as_slice(), &[1, 4, 7, 2], 10, 0.1);
    let (_, want_loss) = mood::npy::read_f32(&fixture(&format!("train/{name}_loss.npy"))).unwrap();
    assert!(
        (loss - want_loss[0]).abs() < 1e-5,
        "{name}: loss {loss} vs torch {}",
        want_loss[0]
    );

    let grads = tape.backward(logits, dlogits).unwrap();
    let want = WeightStore::open(&fixture(&format!("train/{name}_grads.safetensors"))).unwrap();
    let mut worst = 0.0f32;
    for key in want.names() {
        let shape = want.shape_of(key).unwrap().to_vec();
        let w = want.get(key, &shape).unwrap();
        let ours = grads
            .params
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no gradient for `{key}`"));
        let scale = w.as_slice().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(w.as_slice()).enumerate() {
            let err = (a - b).abs();
            worst = worst.max(err / scale.max(1e-6));
            assert!(
                err <= 1e-4 * scale + 1e-6,
                "{name}: `{key}`[{i}]: ours {a}, torch {b} (max |g| {scale})"
            );
        }
    }
    assert_eq!(
        grads.params.len(),
        want.names().count(),
        "{name}: gradient sets differ"
    );
    eprintln!("{name}: loss {loss:.6}, worst gradient error {worst:.2e} of the tensor's max");
}

#[test]
fn beit_gradients_match_torch() {
    check("test_tiny_beit", "tiny_beit");
}

#[test]
fn beit_shared_relpos_gradients_match_torch() {
    check("test_tiny_beit_shared_relpos", "tiny_beit_shared_relpos");
}

#[test]
fn vit_gradients_match_torch() {
    check("test_tiny_vit", "tiny_vit");
}
