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

/// The ALPA step's gradients through the whole model (patch tokens gathered on the tape, two
/// backward seeds) against central finite differences of its loss in f32 (h = 1e-2; tolerance 2%
/// plus 5e-5, the f32 rounding of the loss over 2h).
#[test]
fn alpa_fine_tuning_gradients_match_finite_differences() {
    use mood::model::VitConfig;
    use mood::train::step::{
        add_alpa_params, alpa_loss_and_grads, prepare_for_finetune, AlpaConfig, StepConfig,
    };
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let mut params = mood::model::init::random_store(&cfg, 1)
        .float_tensors()
        .unwrap();
    prepare_for_finetune(&mut params, &cfg, 10, 1);
    add_alpa_params(&mut params, &cfg, 6, 1);
    let mut rng = mood::model::init::Rng::new(9);
    let x: Vec<f32> = (0..3 * 3 * 32 * 32).map(|_| rng.normal() as f32).collect();
    let images = mood::Tensor::from_vec(&[3, 3, 32, 32], x).unwrap();
    let labels = [0usize, 1, 0];
    let sc = StepConfig {
        label_smoothing: 0.1,
        seed: 3,
        ..Default::default()
    };
    let alpa = AlpaConfig {
        weight: 0.5,
        proj: 6,
        shift: 2,
    };
    let (_, grads) = alpa_loss_and_grads(&cfg, &params, &images, &labels, &sc, &alpa).unwrap();
    for name in [
        "alpa.key.0.weight",
        "alpa.query.2.weight",
        "alpa.value.2.weight",
        "blocks.1.mlp.fc2.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.norm1.weight",
        "patch_embed.proj.weight",
        "head.weight",
    ] {
        // The entry with the largest gradient, so the check is well above f32 noise.
        let gs = &grads.params[name];
        let idx = (0..gs.len())
            .max_by(|&a, &b| gs[a].abs().total_cmp(&gs[b].abs()))
            .unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut p = params.clone();
            p.get_mut(name).unwrap().as_mut_slice()[idx] += delta;
            alpa_loss_and_grads(&cfg, &p, &images, &labels, &sc, &alpa)
                .unwrap()
                .0
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let g = grads.params[name][idx];
        assert!(
            (fd - g).abs() <= 2e-2 * g.abs() + 5e-5,
            "{name}[{idx}]: backward {g}, finite difference {fd}"
        );
    }
}

/// The fixture through `alpa_on`, ALPA written over the training executor's ops, on the CPU
/// executor: the same loss, similarity and gradients as PyTorch (tolerances as above), and within
/// 1e-5 (max |diff| / max |value|) of the host reference `Alpa::forward_backward`.
#[test]
fn alpa_on_the_cpu_executor_matches_torch_and_the_reference() {
    use mood::model::cpu_train::CpuTrain;
    use mood::model::layers::Param;
    use mood::train::alpa::alpa_on;
    let (fs, f) = mood::npy::read_f32(&fixture("train/alpa_features.npy")).unwrap();
    let (_, labels) = mood::npy::read_f32(&fixture("train/alpa_labels.npy")).unwrap();
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let bytes = std::fs::read(fixture("train/alpa_loss.npy")).unwrap();
    let want_loss: f64 = npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()[0];
    let w = WeightStore::open(&fixture("train/alpa_weights.safetensors")).unwrap();
    let g = WeightStore::open(&fixture("train/alpa_grads.safetensors")).unwrap();
    let get = |s: &WeightStore, n: &str| s.get(n, s.shape_of(n).unwrap()).unwrap().into_vec();
    let params: [Param; 6] = std::array::from_fn(|i| {
        Param::load(&w, WEIGHT_NAMES[i], w.shape_of(WEIGHT_NAMES[i]).unwrap()).unwrap()
    });
    let (m, t, dim) = (fs[0], fs[1], fs[2]);
    let features = mood::Tensor::from_vec(&[m * t, dim], f.clone()).unwrap();
    let out = alpa_on(&mut CpuTrain, &features, &params, &labels, 10.0, 1.0).unwrap();
    let weights: Vec<Vec<f32>> = WEIGHT_NAMES.iter().map(|n| get(&w, n)).collect();
    let reference = Alpa {
        weights: std::array::from_fn(|i| &weights[i][..]),
        dim,
        proj: w.shape_of("query.2").unwrap()[0],
        scale: 10.0,
    }
    .forward_backward(&f, &labels, t);
    assert!(
        (out.loss as f64 - want_loss).abs() < 1e-5 * want_loss.abs(),
        "loss {} vs torch {want_loss}",
        out.loss
    );
    let worst = |ours: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        ours.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
            / scale
    };
    let mut table = vec![
        ("loss", worst(&[out.loss], &[reference.loss]), 1e-5),
        (
            "similarity",
            worst(&out.similarity, &reference.similarity),
            1e-5,
        ),
        (
            "features",
            worst(&out.d_features, &reference.d_features),
            1e-5,
        ),
        (
            "features (torch)",
            worst(&out.d_features, &get(&g, "features")),
            1e-4,
        ),
    ];
    for (i, n) in WEIGHT_NAMES.iter().enumerate() {
        table.push((n, worst(&out.d_weights[i], &reference.d_weights[i]), 1e-5));
        table.push((n, worst(&out.d_weights[i], &get(&g, n)), 1e-4));
    }
    for (name, err, tol) in table {
        println!("{name:<18} {err:.2e} (≤ {tol:.0e})");
        assert!(err <= tol, "{name}: {err} > {tol}");
    }
}
