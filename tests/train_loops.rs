//! Training loops: a run killed mid-epoch and resumed from its checkpoint ends bit-identical to an
//! uninterrupted one; bad settings fail with a clear message.

use std::collections::BTreeMap;

use mood::model::init::{random_store, Rng};
use mood::model::VitConfig;
use mood::train::checkpoint;
use mood::train::loops::{finetune, pretrain, Dataset, Schedule};
use mood::train::step::{add_mim_params, prepare_for_finetune};
use mood::Tensor;

fn data(n: usize) -> Dataset {
    let mut rng = Rng::new(4);
    Dataset {
        images: (0..n * 3 * 32 * 32).map(|_| rng.normal() as f32).collect(),
        chw: [3, 32, 32],
        labels: (0..n).map(|i| i % 3).collect(),
    }
}

fn params(cfg: &VitConfig) -> BTreeMap<String, Tensor> {
    let store = random_store(cfg, 1);
    store.float_tensors().unwrap()
}

fn schedule(epochs: usize) -> Schedule {
    Schedule {
        epochs,
        batch: 4,
        lr: 1e-3,
        min_lr: 1e-5,
        warmup_epochs: 1,
        weight_decay: 0.05,
        layer_decay: 0.75,
        drop_path: 0.1,
        clip_grad: 1.0,
        seed: 9,
    }
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        assert_eq!(t.as_slice(), b[k].as_slice(), "`{k}` differs");
    }
}

#[test]
fn finetune_killed_and_resumed_equals_an_uninterrupted_run() {
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let d = data(12);
    let mut init = params(&cfg);
    prepare_for_finetune(&mut init, &cfg, 3, 2);
    let mut straight = init.clone();
    let h = finetune(
        &cfg,
        &mut straight,
        &d,
        &schedule(3),
        0.1,
        None,
        None,
        &mut |_, _, _, _| true,
    )
    .unwrap();
    assert_eq!(h.len(), 3);

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let mut killed = init.clone();
    // Killed in the middle of epoch 1: the checkpoint holds epoch 0.
    finetune(
        &cfg,
        &mut killed,
        &d,
        &schedule(3),
        0.1,
        Some(&ck),
        None,
        &mut |e, it, _, _| !(e == 1 && it == 1),
    )
    .unwrap();
    let resume = checkpoint::load(&ck).unwrap();
    assert_eq!(resume.progress.as_ref().unwrap().epoch, 0);
    let mut resumed = init.clone();
    finetune(
        &cfg,
        &mut resumed,
        &d,
        &schedule(3),
        0.1,
        Some(&ck),
        Some(resume),
        &mut |_, _, _, _| true,
    )
    .unwrap();
    assert_same(&straight, &resumed);
    assert!(
        straight
            .values()
            .zip(init.values())
            .any(|(a, b)| a.as_slice() != b.as_slice()),
        "nothing trained"
    );
}

#[test]
fn pretrain_killed_and_resumed_equals_an_uninterrupted_run() {
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let d = data(8);
    let mut init = params(&cfg);
    init.retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
    add_mim_params(&mut init, &cfg, 3);
    let mut straight = init.clone();
    pretrain(
        &cfg,
        &mut straight,
        &d,
        &schedule(2),
        0.4,
        None,
        None,
        &mut |_, _, _, _| true,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("mim.safetensors");
    let mut killed = init.clone();
    pretrain(
        &cfg,
        &mut killed,
        &d,
        &schedule(2),
        0.4,
        Some(&ck),
        None,
        &mut |e, _, _, _| e == 0,
    )
    .unwrap();
    let mut resumed = init.clone();
    let r = checkpoint::load(&ck).unwrap();
    pretrain(
        &cfg,
        &mut resumed,
        &d,
        &schedule(2),
        0.4,
        Some(&ck),
        Some(r),
        &mut |_, _, _, _| true,
    )
    .unwrap();
    assert_same(&straight, &resumed);
}

#[test]
fn bad_settings_are_refused_with_a_message() {
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let d = data(6);
    let mut p = params(&cfg);
    prepare_for_finetune(&mut p, &cfg, 3, 2);
    let mut s = schedule(1);
    s.batch = 7;
    let e = finetune(&cfg, &mut p, &d, &s, 0.0, None, None, &mut |_, _, _, _| {
        true
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--batch 7") && e.contains("6 images"), "{e}");
    let mut s = schedule(1);
    s.lr = f32::NAN;
    s.warmup_epochs = 0;
    let e = finetune(&cfg, &mut p, &d, &s, 0.0, None, None, &mut |_, _, _, _| {
        true
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("learning rate") && e.contains("NaN"), "{e}");

    // A checkpoint of another architecture cannot be resumed.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("vit.safetensors");
    let vit = VitConfig::preset("test_tiny_vit").unwrap();
    let mut pv = params(&vit);
    prepare_for_finetune(&mut pv, &vit, 3, 2);
    finetune(
        &vit,
        &mut pv,
        &d,
        &schedule(1),
        0.0,
        Some(&ck),
        None,
        &mut |_, _, _, _| true,
    )
    .unwrap();
    let r = checkpoint::load(&ck).unwrap();
    let e = finetune(
        &cfg,
        &mut p,
        &d,
        &schedule(2),
        0.0,
        None,
        Some(r),
        &mut |_, _, _, _| true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("test_tiny_vit") && e.contains("test_tiny_beit"),
        "{e}"
    );
}

#[test]
fn finetune_gives_the_same_weights_on_any_number_of_threads() {
    // The gradient reductions split rows into fixed chunks summed in order, so the thread count
    // changes the speed, not the numbers.
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let d = data(24);
    let mut init = params(&cfg);
    prepare_for_finetune(&mut init, &cfg, 3, 2);
    let mut s = schedule(2);
    s.batch = 12; // 12 images x 17 tokens: several row chunks and attention image groups
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut p = init.clone();
        pool.install(|| {
            finetune(&cfg, &mut p, &d, &s, 0.1, None, None, &mut |_, _, _, _| {
                true
            })
            .unwrap()
        });
        p
    };
    let one = run(1);
    assert_same(&one, &run(3));
    assert!(
        one.values()
            .zip(init.values())
            .any(|(a, b)| a.as_slice() != b.as_slice()),
        "nothing trained"
    );
}
