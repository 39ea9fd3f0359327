//! Learning works: fine-tuning the demo's tiny BEiT on the bundled digits reaches ≥ 90% accuracy on
//! the held-out third within a fixed budget, and masked image modelling lowers its reconstruction
//! loss. (Release mode: about a minute on 2 cores.)

use mood::data::digits;
use mood::model::VitConfig;
use mood::train::loops::{accuracy, finetune, pretrain, Dataset, Schedule};
use mood::train::step::{add_mim_params, prepare_for_finetune};

fn dataset(test: bool, size: usize) -> Dataset {
    let d = digits::load().unwrap();
    let (images, labels) = digits::split(&d, &[], test, size);
    Dataset {
        images,
        chw: [3, size, size],
        labels,
    }
}

fn schedule(epochs: usize, lr: f32) -> Schedule {
    Schedule {
        epochs,
        batch: 32,
        lr,
        min_lr: 1e-6,
        warmup_epochs: 3,
        weight_decay: 0.05,
        // From scratch every layer learns at the full rate.
        layer_decay: 1.0,
        drop_path: 0.1,
        clip_grad: 0.0,
        seed: 0,
    }
}

#[test]
fn finetuning_on_digits_reaches_90_percent_held_out() {
    let cfg = VitConfig::preset("beit_tiny_patch8_32").unwrap();
    let (train, test) = (dataset(false, 32), dataset(true, 32));
    let store = mood::model::init::random_store(&cfg, 0);
    let mut params = store.float_tensors().unwrap();
    prepare_for_finetune(&mut params, &cfg, 10, 0);
    let hist = finetune(
        &cfg,
        &mut params,
        &train,
        &schedule(30, 1e-3),
        0.1,
        None,
        None,
        &mut |_, _, _, _| true,
    )
    .unwrap();
    let acc = accuracy(&cfg, &params, &test, 256).unwrap();
    eprintln!(
        "digits: loss {:.3} -> {:.3}, held-out accuracy {:.1}% ({} images)",
        hist[0],
        hist[hist.len() - 1],
        100.0 * acc,
        test.len()
    );
    assert!(acc >= 0.90, "held-out accuracy {acc}");
}

#[test]
fn masked_image_modelling_lowers_reconstruction_loss() {
    let cfg = VitConfig::preset("beit_tiny_patch8_32").unwrap();
    let train = dataset(false, 32);
    let store = mood::model::init::random_store(&cfg, 0);
    let mut params: std::collections::BTreeMap<_, _> = store.float_tensors().unwrap();
    params.retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
    add_mim_params(&mut params, &cfg, 0);
    let hist = pretrain(
        &cfg,
        &mut params,
        &train,
        &schedule(10, 2e-3),
        0.4,
        None,
        None,
        &mut |_, _, _, _| true,
    )
    .unwrap();
    eprintln!("MIM loss per epoch: {hist:?}");
    // Per-patch normalised targets: predicting their mean (0) scores ~0.98. Stated factor: the last
    // epoch's loss is at most 0.75× the first epoch's mean and below 0.6 (measured: 0.77 -> 0.52).
    let last = hist[hist.len() - 1];
    assert!(last < 0.75 * hist[0] && last < 0.6, "{hist:?}");
}

#[test]
fn mos_group_softmax_fine_tuning_learns_and_predicts_by_group() {
    use mood::train::loops::{accuracy_with, FinetuneLoss};
    // Digits 0-4 in two groups (0-1 and 2-3-4); the head has 2 + 3 classes + 2 "others" = 7 outputs.
    let cfg = VitConfig::preset("beit_tiny_patch8_32").unwrap();
    let keep = |d: Dataset| {
        let per = 3 * 32 * 32;
        let rows: Vec<usize> = (0..d.labels.len()).filter(|&i| d.labels[i] < 5).collect();
        Dataset {
            images: rows
                .iter()
                .flat_map(|&i| d.images[i * per..(i + 1) * per].to_vec())
                .collect(),
            chw: d.chw,
            labels: rows.iter().map(|&i| d.labels[i]).collect(),
        }
    };
    let (train, test) = (keep(dataset(false, 32)), keep(dataset(true, 32)));
    let groups = vec![2, 3];
    let mut params = mood::model::init::random_store(&cfg, 0)
        .float_tensors()
        .unwrap();
    prepare_for_finetune(&mut params, &cfg, 7, 0);
    let hist = finetune(
        &cfg,
        &mut params,
        &train,
        &schedule(30, 1e-3),
        FinetuneLoss::GroupSoftmax {
            groups: groups.clone(),
        },
        None,
        None,
        &mut |_, _, _, _| true,
    )
    .unwrap();
    let acc = accuracy_with(&cfg, &params, &test, 256, Some(&groups)).unwrap();
    eprintln!(
        "MOS: loss {:.3} -> {:.3}, held-out accuracy {:.1}%",
        hist[0],
        hist[hist.len() - 1],
        100.0 * acc
    );
    // Measured: 84.8% with the CLI's schedule; chance is 20%.
    assert!(acc >= 0.75, "held-out accuracy {acc}");
    assert!(hist[hist.len() - 1] < 0.6 * hist[0], "{hist:?}");
}
