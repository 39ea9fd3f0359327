//! ResNets through the command line: `mood extract --arch <resnet>` writes the store that the
//! library's forward gives (features, logits, the last stage's map as `--local` tokens, the fc
//! as the store's head), and a checkpoint of the other family is named as such in one line.

mod common;

use common::{assert_refused, extract_arch, fixture};

const ARCH: &str = "test_tiny_resnet_basic_cifar";

fn weights() -> String {
    fixture("resnet/tiny_resnet_basic_cifar.safetensors")
        .to_string_lossy()
        .into_owned()
}

fn npy(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    mood::npy::read_f32(path).unwrap()
}

#[test]
fn extract_runs_a_resnet_with_local_tokens_and_its_head() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let r = extract_arch(
        ARCH,
        &weights(),
        "digits:0-4@test",
        &out,
        &["--local", "--batch", "16"],
        &[],
    );
    assert_eq!(r.0, 0, "{}", r.2);
    let (fs, f) = npy(&out.join("features.npy"));
    let (ls, _) = npy(&out.join("logits.npy"));
    let (locs, local) = npy(&out.join("local.npy"));
    let n = fs[0];
    assert_eq!(fs, vec![n, 32]);
    assert_eq!(ls, vec![n, 10]);
    // 32×32 through the CIFAR stem and three stride-2 stages: a 4×4 map of 32 channels.
    assert_eq!(locs, vec![n, 16, 32]);
    // The pooled feature is the mean of the local tokens (global average pooling).
    for (row, toks) in f.chunks(32).zip(local.chunks(16 * 32)) {
        for (c, want) in row.iter().enumerate() {
            let mean = toks.iter().skip(c).step_by(32).sum::<f32>() / 16.0;
            assert!((mean - want).abs() < 1e-5, "{mean} vs {want}");
        }
    }
    assert!(
        out.join("head.safetensors").exists(),
        "the fc is the store's head"
    );
}

#[test]
fn a_checkpoint_of_the_other_family_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let vit_weights = common::tiny_weights();
    assert_refused(
        &extract_arch(
            ARCH,
            &vit_weights,
            "digits:0-4@test",
            &tmp.path().join("a"),
            &[],
            &[],
        ),
        &[
            "a vision transformer",
            "not --arch test_tiny_resnet_basic_cifar",
        ],
    );
    assert_refused(
        &extract_arch(
            "test_tiny_beit",
            &weights(),
            "digits:0-4@test",
            &tmp.path().join("b"),
            &[],
            &[],
        ),
        &["a ResNet", "not --arch test_tiny_beit"],
    );
    // `--odin` on a ResNet runs since odin_resnet.rs (tests/resnet_odin.rs).
}
