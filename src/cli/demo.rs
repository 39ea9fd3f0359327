//! `mood demo`: the MOOD experiment in miniature on the bundled digits, end to end with no
//! downloads. In-distribution = digits 0–4; near-OOD = digits 5–9; far-OOD = crops of two natural
//! photographs and uniform noise, all rendered alike. Two models of equal training budget:
//! (a) masked-image-modelling pretraining on the ID images, then fine-tuning; (b) fine-tuning from
//! scratch. Both are scored by class-conditional Mahalanobis distance on their features (MOOD's
//! detector), and the table shows whether MIM helps here.

use std::collections::BTreeMap;

use crate::data::digits;
use crate::error::{Error, Result};
use crate::metrics;
use crate::model::{VisionTransformer, VitConfig};
use crate::ood::gaussian::GaussianScore;
use crate::tensor::Tensor;
use crate::train::loops::{accuracy, finetune, pretrain, Dataset, Schedule};
use crate::train::step::{add_mim_params, prepare_for_finetune};
use crate::weights::WeightStore;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Masked-image-modelling epochs of model (a).
    #[arg(long, default_value_t = 30)]
    pub pretrain_epochs: usize,
    /// Fine-tuning epochs of model (a); model (b) fine-tunes for both budgets together.
    #[arg(long, default_value_t = 30)]
    pub finetune_epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

static WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit.safetensors");
static INPUT: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit_input.npy");
static TIMM_FEATURES: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit_features.npy");

fn npy(name: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let f = npyz::NpyFile::new(bytes).map_err(|e| Error::format(name, e.to_string()))?;
    let shape = f.shape().iter().map(|&s| s as usize).collect();
    let data = f
        .into_vec::<f32>()
        .map_err(|e| Error::format(name, e.to_string()))?;
    Ok((shape, data))
}

/// The engine against timm on the bundled tiny BEiT: max |ours − timm| of the features.
fn engine_check() -> Result<f32> {
    let cfg = VitConfig::preset("test_tiny_beit")?;
    let store = WeightStore::from_safetensors_bytes("<embedded tiny_beit>", WEIGHTS)?;
    let model = VisionTransformer::load(&cfg, &store)?;
    let (shape, x) = npy("<embedded input>", INPUT)?;
    let (_, want) = npy("<embedded timm features>", TIMM_FEATURES)?;
    let out = model.forward(&Tensor::from_vec(&shape, x)?)?;
    Ok(out
        .features
        .as_slice()
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max))
}

fn features(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    images: &[f32],
) -> Result<Vec<f32>> {
    let store = WeightStore::from_params("<demo model>", params);
    let model = VisionTransformer::load(cfg, &store)?;
    let per = 3 * cfg.img_size * cfg.img_size;
    let mut out = Vec::new();
    for chunk in images.chunks(256 * per) {
        let x = Tensor::from_vec(
            &[chunk.len() / per, 3, cfg.img_size, cfg.img_size],
            chunk.to_vec(),
        )?;
        out.extend_from_slice(model.forward(&x)?.features.as_slice());
    }
    Ok(out)
}

fn schedule(epochs: usize, layer_decay: f32, seed: u64) -> Schedule {
    Schedule {
        epochs,
        batch: 32,
        lr: 1e-3,
        min_lr: 1e-6,
        warmup_epochs: (epochs / 10).max(1).min(epochs),
        weight_decay: 0.05,
        layer_decay,
        drop_path: 0.1,
        clip_grad: 0.0,
        seed,
    }
}

struct Sets {
    train: Dataset,
    id_test: Dataset,
    ood: Vec<(&'static str, Vec<f32>)>,
}

fn data(size: usize, seed: u64) -> Result<Sets> {
    let d = digits::load()?;
    let id: Vec<usize> = (0..5).collect();
    let near: Vec<usize> = (5..10).collect();
    let (ti, tl) = digits::split(&d, &id, false, size);
    let (vi, vl) = digits::split(&d, &id, true, size);
    let (near_test, _) = digits::split(&d, &near, true, size);
    let photos = digits::render_all(&digits::photo_crops(300, seed)?, size);
    let noise = digits::render_all(&digits::noise(300, seed), size);
    Ok(Sets {
        train: Dataset {
            images: ti,
            chw: [3, size, size],
            labels: tl,
        },
        id_test: Dataset {
            images: vi,
            chw: [3, size, size],
            labels: vl,
        },
        ood: vec![
            ("digits 5-9 (near)", near_test),
            ("photo crops (far)", photos),
            ("noise (far)", noise),
        ],
    })
}

struct Row {
    name: String,
    acc: f32,
    results: Vec<metrics::Metrics>,
}

fn evaluate(
    name: &str,
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    sets: &Sets,
) -> Result<Row> {
    let d = cfg.embed_dim;
    let train_f = features(cfg, params, &sets.train.images)?;
    let maha = GaussianScore::tied(&train_f, &sets.train.labels, d)?;
    let id_scores = maha.score(&features(cfg, params, &sets.id_test.images)?)?;
    let results = sets
        .ood
        .iter()
        .map(|(_, imgs)| metrics::evaluate(&id_scores, &maha.score(&features(cfg, params, imgs)?)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Row {
        name: name.to_string(),
        acc: accuracy(cfg, params, &sets.id_test, 256)?,
        results,
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.pretrain_epochs == 0 || args.finetune_epochs == 0 {
        return Err(Error::Usage(
            "--pretrain-epochs and --finetune-epochs must be at least 1".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let diff = engine_check()?;
    println!(
        "mood demo: MOOD in miniature on the bundled digits (CPU, {} threads)",
        rayon::current_num_threads()
    );
    println!("  engine check: tiny BEiT features vs timm, max |diff| = {diff:.1e}");
    if diff > 1e-4 {
        return Err(Error::Data(format!(
            "engine output differs from timm by {diff:.2e} (> 1e-4)"
        )));
    }
    let cfg = VitConfig::preset("beit_tiny_patch8_32")?;
    let sets = data(cfg.img_size, args.seed)?;
    println!(
        "  ID: digits 0-4 ({} train, {} test); OOD: {}",
        sets.train.len(),
        sets.id_test.len(),
        sets.ood
            .iter()
            .map(|(n, v)| format!("{n} {}", v.len() / (3 * cfg.img_size * cfg.img_size)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let store = crate::model::init::random_store(&cfg, args.seed);
    let init = store.float_tensors()?;
    let (p, f) = (args.pretrain_epochs, args.finetune_epochs);
    let steps = |e: usize| (e * (sets.train.len() / 32)) as u64;
    let pb = super::train_common::step_bar(steps(p) + steps(f) + steps(p + f), 0);
    let mut tick = |_: usize, _: usize, _: usize, loss: f32| {
        pb.set_message(format!("loss {loss:.3}"));
        pb.inc(1);
        true
    };

    // (a) MOOD: masked image modelling on the ID images, then fine-tuning.
    let mut mim = init.clone();
    mim.retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
    add_mim_params(&mut mim, &cfg, args.seed);
    let mim_hist = pretrain(
        &cfg,
        &mut mim,
        &sets.train,
        &schedule(p, 1.0, args.seed),
        0.4,
        None,
        None,
        &mut tick,
    )?;
    prepare_for_finetune(&mut mim, &cfg, 5, args.seed);
    finetune(
        &cfg,
        &mut mim,
        &sets.train,
        &schedule(f, 0.9, args.seed),
        0.1,
        None,
        None,
        &mut tick,
    )?;

    // (b) the same budget of supervised training from scratch.
    let mut scratch = init;
    prepare_for_finetune(&mut scratch, &cfg, 5, args.seed);
    finetune(
        &cfg,
        &mut scratch,
        &sets.train,
        &schedule(p + f, 1.0, args.seed),
        0.1,
        None,
        None,
        &mut tick,
    )?;
    pb.finish_and_clear();

    let rows = [
        evaluate(
            &format!("MIM {p} ep -> fine-tune {f} ep"),
            &cfg,
            &mim,
            &sets,
        )?,
        evaluate(
            &format!("fine-tune {} ep from scratch", p + f),
            &cfg,
            &scratch,
            &sets,
        )?,
    ];
    println!(
        "  MIM reconstruction loss {:.3} -> {:.3}; detector: class-conditional Mahalanobis on fc_norm features",
        mim_hist.first().copied().unwrap_or(f32::NAN),
        mim_hist.last().copied().unwrap_or(f32::NAN)
    );
    println!();
    let mut header = String::from("| model | ID acc |");
    let mut rule = String::from("|---|---:|");
    for (n, _) in &sets.ood {
        header += &format!(" {n} AUROC / FPR95 |");
        rule += "---:|";
    }
    println!("{header}\n{rule}");
    for r in &rows {
        let cells: String = r
            .results
            .iter()
            .map(|m| format!(" {:.2} / {:.2} |", 100.0 * m.auroc, 100.0 * m.fpr95))
            .collect();
        println!("| {} | {:.2} |{cells}", r.name, 100.0 * r.acc);
    }
    println!();
    println!(
        "(AUROC and FPR@95%TPR in %, ID = positive class; {:.0} s in all)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
