//! The fine-tuning losses beyond plain cross-entropy on a CUDA device against the CPU executor,
//! through the one description each has over `TrainExec`:
//!   - ALPA (`train::alpa::alpa_on`: bias-free linears, ReLU, the cross-view attention terms on
//!     the device, SupCon over the M×M terms on the host) on the PyTorch fixture of tests/alpa.rs:
//!     loss, similarity and every gradient within 1e-5 (max |cuda − cpu| / max |cpu|) of the CPU
//!     executor, and two CUDA runs bit-identical;
//!   - the gradient table of a whole MOS step (group softmax on the device) and a whole ALPA
//!     step (two views, CE + 0.5·ALPA) on the tiny BEiT: every parameter's gradient, ALPA's MLPs
//!     included, within 1e-5 of the CPU tape's, the losses within 1e-5 relative.
//!
//! Without a usable GPU they run on the CPU stand-in for CUDA (tests/common/cuda.rs).

#![cfg(feature = "cuda")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::fixture;
use mood::backend::cuda::CudaDevice;
use mood::model::cpu_train::CpuTrain;
use mood::model::cuda_exec::CudaExec;
use mood::model::layers::Param;
use mood::model::train_exec::TrainExec;
use mood::model::{VisionTransformer, VitConfig};
use mood::train::alpa::{alpa_on, WEIGHT_NAMES};
use mood::train::step::{
    add_alpa_params, alpa_forward, prepare_for_finetune, AlpaConfig, StepConfig,
};
use mood::train::tape::Tape;
use mood::weights::WeightStore;
use mood::Tensor;

const TOL: f32 = 1e-5;

/// max |got − want| / max |want|.
fn err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() })
        .fold(0.0f32, f32::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn cuda_exec(dev: &Arc<CudaDevice>) -> CudaExec<f32> {
    CudaExec::<f32>::new(Arc::clone(dev), "test_tiny_beit", 16)
}

/// ALPA of the fixture on executor `ex`: (loss, similarity, [features, six weights] gradients).
fn alpa_fixture_on<E: TrainExec>(ex: &mut E) -> (f32, Vec<f32>, Vec<Vec<f32>>) {
    let (fs, f) = mood::npy::read_f32(&fixture("train/alpa_features.npy")).unwrap();
    let (_, labels) = mood::npy::read_f32(&fixture("train/alpa_labels.npy")).unwrap();
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let w = WeightStore::open(&fixture("train/alpa_weights.safetensors")).unwrap();
    let params: [Param; 6] = std::array::from_fn(|i| {
        let n = WEIGHT_NAMES[i];
        Param::load(&w, n, w.shape_of(n).unwrap()).unwrap()
    });
    let features = Tensor::from_vec(&[fs[0] * fs[1], fs[2]], f).unwrap();
    let features = ex.input(&features).unwrap();
    let out = alpa_on(ex, &features, &params, &labels, 10.0, 1.0).unwrap();
    let mut grads = vec![ex.grad_to_host(&out.d_features).unwrap()];
    for g in &out.d_weights {
        grads.push(ex.grad_to_host(g).unwrap());
    }
    (out.loss, out.similarity, grads)
}

#[test]
fn alpa_on_cuda_matches_the_cpu_executor_and_repeats() {
    let Some(dev) = common::cuda::device("alpa_on_cuda_matches_the_cpu_executor_and_repeats")
    else {
        return;
    };
    let dev = Arc::new(dev);
    let (cl, cs, cg) = alpa_fixture_on(&mut CpuTrain);
    let (gl, gs, gg) = alpa_fixture_on(&mut cuda_exec(&dev));
    let (gl2, gs2, gg2) = alpa_fixture_on(&mut cuda_exec(&dev));
    let names = std::iter::once("features").chain(WEIGHT_NAMES);
    let mut rows = vec![("loss", err(&[gl], &[cl])), ("similarity", err(&gs, &cs))];
    rows.extend(
        names
            .zip(gg.iter().zip(&cg))
            .map(|(n, (g, c))| (n, err(g, c))),
    );
    for (name, e) in &rows {
        println!("alpa {name:<12} err {e:.2e}");
        assert!(*e <= TOL, "{name}: {e} > {TOL}");
    }
    assert_eq!(
        gl.to_bits(),
        gl2.to_bits(),
        "two CUDA runs: different losses"
    );
    assert_eq!(gs, gs2, "two CUDA runs: different similarities");
    for (a, b) in gg.iter().zip(&gg2) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "two CUDA runs: different gradients"
        );
    }
}

fn tiny_params(outputs: usize, alpa_proj: Option<usize>) -> (VitConfig, BTreeMap<String, Tensor>) {
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let mut params = mood::model::init::random_store(&cfg, 1)
        .float_tensors()
        .unwrap();
    prepare_for_finetune(&mut params, &cfg, outputs, 1);
    if let Some(p) = alpa_proj {
        add_alpa_params(&mut params, &cfg, p, 1);
    }
    // A head of a useful size (the fine-tuning init is scaled by 1e-3).
    let mut rng = mood::model::init::Rng::new(5);
    for v in params.get_mut("head.weight").unwrap().as_mut_slice() {
        *v = rng.normal() as f32 * 0.05;
    }
    (cfg, params)
}

fn images(b: usize) -> Tensor {
    let mut rng = mood::model::init::Rng::new(9);
    let x: Vec<f32> = (0..b * 3 * 32 * 32).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(&[b, 3, 32, 32], x).unwrap()
}

/// Backward from `seeds` on `tape`; the gradients on the host.
fn grads_of<E: TrainExec>(
    tape: Tape<E>,
    seeds: Vec<(mood::train::tape::Var, E::Grad)>,
) -> HashMap<String, Vec<f32>> {
    let (grads, mut ex) = tape.backward_from(seeds).unwrap();
    grads
        .params
        .iter()
        .map(|(k, v)| (k.clone(), ex.grad_to_host(v).unwrap()))
        .collect()
}

/// Loss and gradients of a MOS step (groups [2, 1] over 3 classes) on `tape`.
fn mos_step<E: TrainExec>(mut tape: Tape<E>) -> (f32, HashMap<String, Vec<f32>>) {
    let groups = [2, 1];
    let (cfg, params) = tiny_params(5, None);
    let store = WeightStore::from_params("<params>", &params);
    let model = VisionTransformer::load(&cfg, &store).unwrap();
    let (_, logits) = model.forward_with(&mut tape, &images(4)).unwrap();
    let logits = logits.unwrap();
    let (loss, dz) = tape.group_softmax(&logits, &groups, &[0, 1, 2, 1]).unwrap();
    (loss, grads_of(tape, vec![(logits, dz)]))
}

/// Loss and gradients of an ALPA step (CE + 0.5·ALPA over two views, d = 6) on `tape`.
fn alpa_step<E: TrainExec>(mut tape: Tape<E>) -> (f32, HashMap<String, Vec<f32>>) {
    let (cfg, params) = tiny_params(10, Some(6));
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
    let (loss, seeds) =
        alpa_forward(&mut tape, &cfg, &params, &images(3), &[0, 1, 0], &sc, &alpa).unwrap();
    (loss, grads_of(tape, seeds))
}

#[test]
fn mos_and_alpa_step_gradients_on_cuda_match_the_cpu_tape() {
    let Some(dev) = common::cuda::device("mos_and_alpa_step_gradients_on_cuda_match_the_cpu_tape")
    else {
        return;
    };
    let dev = Arc::new(dev);
    type Step = fn(Tape<CpuTrain>) -> (f32, HashMap<String, Vec<f32>>);
    type CudaStep = fn(Tape<CudaExec<f32>>) -> (f32, HashMap<String, Vec<f32>>);
    let cases: [(&str, Step, CudaStep); 2] = [
        ("mos", mos_step::<CpuTrain>, mos_step::<CudaExec<f32>>),
        ("alpa", alpa_step::<CpuTrain>, alpa_step::<CudaExec<f32>>),
    ];
    for (name, cpu_step, cuda_step) in cases {
        let (cl, cg) = cpu_step(Tape::on(CpuTrain));
        let (gl, gg) = cuda_step(Tape::on(cuda_exec(&dev)));
        let mut keys: Vec<&String> = cg.keys().collect();
        keys.sort();
        let gkeys: Vec<&String> = {
            let mut k: Vec<&String> = gg.keys().collect();
            k.sort();
            k
        };
        assert_eq!(keys, gkeys, "{name}: the same parameters get gradients");
        if name == "alpa" {
            assert!(
                cg.contains_key("alpa.value.2.weight"),
                "ALPA's MLPs are trained"
            );
        }
        let (worst, at) = keys
            .iter()
            .map(|k| (err(&gg[*k], &cg[*k]), k.as_str()))
            .fold((0.0f32, ""), |a, b| if b.0 > a.0 { b } else { a });
        let le = (gl - cl).abs() / cl.abs();
        println!(
            "{name}: loss cpu {cl:.6} cuda {gl:.6} (rel {le:.1e}); {} gradients, worst err {worst:.2e} ({at})",
            keys.len()
        );
        assert!(le <= TOL, "{name}: loss {gl} vs {cl}");
        assert!(worst <= TOL, "{name}: {at} err {worst} > {TOL}");
    }
}
