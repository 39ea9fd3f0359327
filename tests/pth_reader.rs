//! The restricted PyTorch reader against safetensors files written by the Python `safetensors`
//! package from the same tensors (tools/make_pth_fixtures.py): names, dtypes, shapes and bytes.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::fixture;
use mood::weights::{pth, WeightStore};

fn expected(name: &str) -> BTreeMap<String, (Vec<usize>, String, Vec<u8>)> {
    let store = WeightStore::open(&fixture(&format!("pth/{name}.expected.safetensors"))).unwrap();
    store
        .raw_tensors()
        .into_iter()
        .map(|t| (t.name, (t.shape, format!("{:?}", t.dtype), t.data)))
        .collect()
}

fn check(name: &str) {
    let ours: BTreeMap<String, (Vec<usize>, String, Vec<u8>)> =
        pth::read(&fixture(&format!("pth/{name}.pth")))
            .unwrap()
            .into_iter()
            .map(|t| (t.name, (t.shape, format!("{:?}", t.dtype), t.data)))
            .collect();
    // The expected file went through WeightStore, whose key map strips `module.`: compare likewise.
    let ours: BTreeMap<_, _> = ours
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .collect();
    let want = expected(name);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{name}: names"
    );
    for (k, (shape, dtype, data)) in &want {
        let (s, d, b) = &ours[k];
        assert_eq!((s, d), (shape, dtype), "{name}: `{k}` shape/dtype");
        assert!(b == data, "{name}: `{k}` bytes differ");
    }
}

#[test]
fn plain_state_dict_with_every_dtype() {
    check("plain");
}

#[test]
fn state_dict_nested_under_model_with_non_tensor_entries() {
    check("nested_model");
}

#[test]
fn state_dict_nested_under_module_with_prefixed_keys() {
    check("nested_module");
}

#[test]
fn non_contiguous_and_shared_storage_views() {
    check("views");
}

#[test]
fn legacy_and_torchscript_files_are_refused_with_advice() {
    let e = WeightStore::open(&fixture("pth/legacy.pth"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("legacy") && e.contains("torch.save"), "{e}");
    let e = WeightStore::open(&fixture("pth/scripted.pt"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("TorchScript"), "{e}");
}

#[test]
fn truncated_or_corrupted_files_give_errors_not_panics() {
    let bytes = std::fs::read(fixture("timm/tiny_beit.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.pth");
    for cut in [
        4,
        100,
        1000,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 30,
    ] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let r = std::panic::catch_unwind(|| WeightStore::open(&p).map(|_| ()));
        assert!(matches!(r, Ok(Err(_))), "cut at {cut}: expected an error");
    }
    // Flip bytes inside data.pkl (stored uncompressed near the start of the archive).
    for at in [80, 120, 200, 300] {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        std::fs::write(&p, &b).unwrap();
        let r = std::panic::catch_unwind(|| WeightStore::open(&p).map(|_| ()));
        assert!(r.is_ok(), "corruption at {at} panicked");
    }
}

#[test]
fn convert_writes_safetensors_equal_to_the_pth() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("beit.safetensors");
    let st = Command::new(env!("CARGO_BIN_EXE_mood"))
        .args([
            "convert",
            fixture("timm/tiny_beit.pth").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let a = WeightStore::open(&out).unwrap().raw_tensors();
    let b = WeightStore::open(&fixture("timm/tiny_beit.safetensors"))
        .unwrap()
        .raw_tensors();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        assert!(x.data == y.data, "`{}` differs", x.name);
    }
    // A bad input: non-zero exit, one line, and no output file.
    let bad = dir.path().join("bad.safetensors");
    let st = Command::new(env!("CARGO_BIN_EXE_mood"))
        .args([
            "convert",
            fixture("pth/legacy.pth").to_str().unwrap(),
            "-o",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success() && err.lines().count() == 1 && err.contains("legacy"),
        "{err}"
    );
    assert!(!bad.exists());
}
