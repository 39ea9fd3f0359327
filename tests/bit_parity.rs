//! timm's BiT ResNet-v2 against mood's (src/model/bit.rs) on a tiny model with every parameter
//! randomised, GroupNorm affines included (tools/make_bit_fixtures.py), loaded from the three
//! layouts the fixture script writes with the same weights: timm's safetensors, Google's BiT
//! .npz (`resnet/...` names, HWIO kernels) and MOS's fine-tuned `.pth.tar` (big_transfer's
//! PyTorch names under "model", prefixed `module.`). Features and logits within 1e-4 of the
//! largest value.

mod common;

use common::{assert_refused, extract_arch, fixture};
use mood::model::bit::{parameter_shapes, Bit, BitConfig};
use mood::weights::WeightStore;
use mood::Tensor;

const LAYOUTS: [&str; 3] = [
    "tiny_bit.safetensors",
    "tiny_bit.npz",
    "tiny_bit-group-finetune.pth.tar",
];

fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f32::max)
}

fn read(what: &str) -> (Vec<usize>, Vec<f32>) {
    mood::npy::read_f32(&fixture(&format!("bit/tiny_bit_{what}.npy"))).unwrap()
}

#[test]
fn tiny_bit_matches_timm_from_every_layout() {
    let cfg = BitConfig::preset("test_tiny_bit").unwrap();
    let (shape, x) = read("input");
    let (_, f) = read("features");
    let (_, l) = read("logits");
    let x = Tensor::from_vec(&shape, x).unwrap();
    let mut failures = Vec::new();
    for file in LAYOUTS {
        let store = WeightStore::open(&fixture(&format!("bit/{file}"))).unwrap();
        let model = Bit::load(&cfg, &store).unwrap();
        assert!(store.unused().is_empty(), "{file}: {:?}", store.unused());
        let out = model.forward(&x).unwrap();
        let ef = rel(out.features.as_slice(), &f);
        let el = rel(out.logits.expect("fixture has a head").as_slice(), &l);
        let ok = ef <= 1e-4 && el <= 1e-4;
        println!(
            "{} {file}: max diff / max |value| vs timm: features {ef:.2e}, logits {el:.2e} (tol 1e-4)",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failures.push(file);
        }
    }
    assert!(failures.is_empty(), "BiT differs from timm: {failures:?}");
}

#[test]
fn local_tokens_average_to_the_feature() {
    let cfg = BitConfig::preset("test_tiny_bit").unwrap();
    let store = WeightStore::open(&fixture("bit/tiny_bit.safetensors")).unwrap();
    let model = Bit::load(&cfg, &store).unwrap();
    let (shape, x) = read("input");
    let (out, local) = model
        .forward_local(&Tensor::from_vec(&shape, x).unwrap())
        .unwrap();
    // 48 → 24 (stem) → 12 (pool) → 12, 6, 3, 2 by stage.
    assert_eq!(local.shape(), &[2, 4, 64]);
    assert_eq!(model.final_grid(48), (2, 2));
    for (row, toks) in out
        .features
        .as_slice()
        .chunks(64)
        .zip(local.as_slice().chunks(4 * 64))
    {
        for (c, want) in row.iter().enumerate() {
            let mean = toks.iter().skip(c).step_by(64).sum::<f32>() / 4.0;
            assert!((mean - want).abs() < 1e-5, "{mean} vs {want}");
        }
    }
}

#[test]
fn the_parameter_list_is_timms_state_dict() {
    let cfg = BitConfig::preset("test_tiny_bit").unwrap();
    for file in LAYOUTS {
        let store = WeightStore::open(&fixture(&format!("bit/{file}"))).unwrap();
        let mut got: Vec<(String, Vec<usize>)> = store
            .names()
            .map(|k| (k.clone(), store.shape_of(k).unwrap().to_vec()))
            .collect();
        let mut ours = parameter_shapes(&cfg);
        got.sort();
        ours.sort();
        assert_eq!(ours, got, "{file}");
    }
}

#[test]
fn a_missing_or_misshapen_tensor_is_named() {
    // The tiny checkpoint under the full-size config: the stem has 8 channels, not 64.
    let cfg = BitConfig::preset("resnetv2_101x1_bit").unwrap();
    for file in LAYOUTS {
        let store = WeightStore::open(&fixture(&format!("bit/{file}"))).unwrap();
        let e = Bit::load(&cfg, &store)
            .err()
            .expect("wrong widths accepted")
            .to_string();
        assert!(e.contains("stem.conv.weight"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn a_bad_npz_is_refused_in_one_line_naming_the_array() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    // An int64 array under a kernel's name, then a truncated array.
    let cases: [(&str, Vec<u8>); 2] = [
        ("resnet/root_block/standardized_conv2d/kernel.npy", {
            let mut b = mood::npy::header_bytes("<i8", &[2]);
            b.extend_from_slice(&[0u8; 16]);
            b
        }),
        ("resnet/group_norm/gamma.npy", {
            let mut b = mood::npy::header_bytes("<f4", &[4]);
            b.extend_from_slice(&[0u8; 8]);
            b
        }),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("bad{i}.npz"));
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        z.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(bytes).unwrap();
        z.finish().unwrap();
        let e = WeightStore::open(&path)
            .err()
            .expect("bad npz accepted")
            .to_string();
        assert!(e.contains(name), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn r101x1_costs_what_timm_counts() {
    // fvcore/timm count 7.80 GMACs for resnetv2_101x1_bit at 224 (the 1000-class head included).
    let cfg = BitConfig::preset("resnetv2_101x1_bit").unwrap();
    let model = Bit::load(&cfg, &mood::model::bit::random_store(&cfg, 0)).unwrap();
    let gmacs = model.flops_per_image() / 2e9;
    assert!((gmacs - 7.80).abs() < 0.05, "{gmacs} GMACs");
    assert_eq!(cfg.feature_dim(), 2048);
}

#[test]
fn extract_runs_bit_and_a_checkpoint_of_another_family_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    // The digits are 8×8 → the preset's 48×48 input.
    let npz = fixture("bit/tiny_bit.npz").to_string_lossy().into_owned();
    let r = extract_arch(
        "test_tiny_bit",
        &npz,
        "digits:0-4@test",
        &out,
        &["--local", "--batch", "16"],
        &[],
    );
    assert_eq!(r.0, 0, "{}", r.2);
    let (fs, _) = mood::npy::read_f32(&out.join("features.npy")).unwrap();
    let (ls, _) = mood::npy::read_f32(&out.join("logits.npy")).unwrap();
    let (locs, _) = mood::npy::read_f32(&out.join("local.npy")).unwrap();
    assert_eq!(fs[1..], [64]);
    assert_eq!(ls[1..], [10]);
    assert_eq!(locs[1..], [4, 64]);
    assert!(out.join("head.safetensors").exists());

    let pth = fixture("bit/tiny_bit-group-finetune.pth.tar")
        .to_string_lossy()
        .into_owned();
    for (arch, weights, want) in [
        ("resnet50", &npz, "a BiT ResNet-v2"),
        ("test_tiny_beit", &pth, "a BiT ResNet-v2"),
        (
            "test_tiny_bit",
            &fixture("resnet/tiny_resnet_basic.safetensors")
                .to_string_lossy()
                .into_owned(),
            "a ResNet (keys layer1",
        ),
        (
            "test_tiny_bit",
            &common::tiny_weights(),
            "a vision transformer",
        ),
    ] {
        assert_refused(
            &extract_arch(
                arch,
                weights,
                "digits:0-4@test",
                &tmp.path().join(format!("x-{arch}")),
                &[],
                &[],
            ),
            &[want, &format!("not --arch {arch}")],
        );
    }
}

#[test]
fn mood_forward_gives_timms_outputs_from_moss_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (f, l) = (tmp.path().join("f.npy"), tmp.path().join("l.npy"));
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let r = common::run_mood(&[
        "forward",
        "--arch",
        "test_tiny_bit",
        "--weights",
        &s(&fixture("bit/tiny_bit-group-finetune.pth.tar")),
        "--input",
        &s(&fixture("bit/tiny_bit_input.npy")),
        "--features",
        &s(&f),
        "--logits",
        &s(&l),
    ]);
    assert_eq!(r.0, 0, "{}", r.2);
    assert!(!r.2.contains("not used"), "{}", r.2);
    let (_, got_f) = mood::npy::read_f32(&f).unwrap();
    let (_, got_l) = mood::npy::read_f32(&l).unwrap();
    assert!(rel(&got_f, &read("features").1) <= 1e-4);
    assert!(rel(&got_l, &read("logits").1) <= 1e-4);
}

#[test]
fn mood_convert_writes_the_official_layouts_under_timms_names() {
    // timm's load_state_dict(strict=True) takes the result (checked by hand with the fixture
    // script's model: the same logits bit for bit).
    let tmp = tempfile::tempdir().unwrap();
    let cfg = BitConfig::preset("test_tiny_bit").unwrap();
    let mut want: Vec<(String, Vec<usize>)> = parameter_shapes(&cfg);
    want.sort();
    for file in &LAYOUTS[1..] {
        let out = tmp.path().join(format!("{file}.safetensors"));
        let r = common::run_mood(&[
            "convert",
            &fixture(&format!("bit/{file}")).to_string_lossy(),
            "-o",
            &out.to_string_lossy(),
        ]);
        assert_eq!(r.0, 0, "{}", r.2);
        let store = WeightStore::open(&out).unwrap();
        let mut got: Vec<(String, Vec<usize>)> = store
            .names()
            .map(|k| (k.clone(), store.shape_of(k).unwrap().to_vec()))
            .collect();
        got.sort();
        assert_eq!(got, want, "{file}");
    }
}
