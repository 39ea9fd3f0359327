//! BEiT / ViT forward against timm: fixtures made by tools/make_fixtures.py (tiny models with every
//! parameter randomised, run by timm in float32). Tolerance 1e-4 absolute; outputs are O(1).

mod common;

use common::{assert_max_abs, fixture};
use mood::model::{VisionTransformer, VitConfig};
use mood::weights::WeightStore;
use mood::Tensor;

fn load_npy(rel: &str) -> (Vec<usize>, Vec<f32>) {
    mood::npy::read_f32(&fixture(rel)).unwrap()
}

fn check(arch: &str, weights: &str, refs: &str) {
    let cfg = VitConfig::preset(arch).unwrap();
    let store = WeightStore::open(&fixture(&format!("timm/{weights}"))).unwrap();
    let model = VisionTransformer::load(&cfg, &store).unwrap();
    assert!(
        store.unused().is_empty(),
        "unused tensors: {:?}",
        store.unused()
    );
    let (shape, x) = load_npy(&format!(
        "timm/{arch_in}_input.npy",
        arch_in = refs.split("_f16").next().unwrap()
    ));
    let out = model
        .forward(&Tensor::from_vec(&shape, x).unwrap())
        .unwrap();
    let (fshape, f) = load_npy(&format!("timm/{refs}_features.npy"));
    let (lshape, l) = load_npy(&format!("timm/{refs}_logits.npy"));
    assert_eq!(out.features.shape(), &fshape[..]);
    let logits = out.logits.expect("fixture has a head");
    assert_eq!(logits.shape(), &lshape[..]);
    let ef = assert_max_abs(
        out.features.as_slice(),
        &f,
        1e-4,
        &format!("{arch} features"),
    );
    let el = assert_max_abs(logits.as_slice(), &l, 1e-4, &format!("{arch} logits"));
    eprintln!("{arch} ({weights}): max |diff| features {ef:.2e}, logits {el:.2e}");
}

#[test]
fn beit_per_block_relpos_matches_timm() {
    check("test_tiny_beit", "tiny_beit.safetensors", "tiny_beit");
}

#[test]
fn beit_shared_relpos_matches_timm() {
    check(
        "test_tiny_beit_shared_relpos",
        "tiny_beit_shared_relpos.safetensors",
        "tiny_beit_shared_relpos",
    );
}

#[test]
fn vit_abs_pos_matches_timm() {
    check("test_tiny_vit", "tiny_vit.safetensors", "tiny_vit");
}

#[test]
fn beit_f16_weights_are_converted_on_load() {
    check(
        "test_tiny_beit",
        "tiny_beit_f16.safetensors",
        "tiny_beit_f16",
    );
}

#[test]
fn beit_from_pth_nested_under_model_matches_timm() {
    check("test_tiny_beit", "tiny_beit.pth", "tiny_beit");
}

#[test]
fn f32_safetensors_weights_are_memory_mapped_not_copied() {
    let store = WeightStore::open(&fixture("timm/tiny_beit.safetensors")).unwrap();
    let w = store.get("blocks.0.mlp.fc1.weight", &[192, 48]).unwrap();
    assert!(
        w.is_mapped(),
        "f32 weights should be a view into the mapped file"
    );
    let f16 = WeightStore::open(&fixture("timm/tiny_beit_f16.safetensors")).unwrap();
    assert!(!f16
        .get("blocks.0.mlp.fc1.weight", &[192, 48])
        .unwrap()
        .is_mapped());
}

#[test]
fn shape_mismatch_names_the_tensor_and_both_shapes() {
    // The ViT checkpoint read as BEiT: the first missing BEiT tensor is reported by name.
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let store = WeightStore::open(&fixture("timm/tiny_vit.safetensors")).unwrap();
    let e = VisionTransformer::load(&cfg, &store)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing") && e.contains("tiny_vit.safetensors"),
        "{e}"
    );
    let store = WeightStore::open(&fixture("timm/tiny_beit.safetensors")).unwrap();
    let e = store
        .get("blocks.0.attn.qkv.weight", &[96, 48])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocks.0.attn.qkv.weight") && e.contains("[96, 48]") && e.contains("[144, 48]"),
        "{e}"
    );
}
