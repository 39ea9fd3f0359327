//! The plan of `mood demo`: the MOOD experiment in miniature on the bundled digits, end to end with
//! no downloads. In-distribution = digits 0–4; near-OOD = digits 5–9; far-OOD = crops of two
//! natural photographs and uniform noise, all rendered alike. Two models of equal training budget:
//! (a) masked-image-modelling pretraining on the ID images, then fine-tuning; (b) fine-tuning from
//! scratch. Each model's features, logits and patch tokens go into feature stores, and every OOD
//! method is fitted and evaluated on them (`mood eval`'s code path, pipeline::eval).
//!
//! The steps are `Demo::prepare` (checks, the engine against timm, the device, the data),
//! `Demo::train` (both models) and `Demo::evaluate` (stores and reports); cli/demo.rs prints
//! between them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::{Device, Precision};
use crate::data::digits;
use crate::error::{Error, Result};
use crate::model::backbone::Backbone;
use crate::model::{VisionTransformer, VitConfig};
use crate::ood::detector::METHODS;
use crate::report::Report;
use crate::tensor::Tensor;
use crate::train::device::TrainOn;
use crate::train::loops::{accuracy, finetune_on, pretrain_on, Dataset, OnStep, Schedule};
use crate::train::step::{add_mim_params, prepare_for_finetune};
use crate::weights::WeightStore;

/// What `mood demo` is asked for.
pub struct Options {
    /// Masked-image-modelling epochs of model (a).
    pub pretrain_epochs: usize,
    /// Fine-tuning epochs of model (a); model (b) fine-tunes for both budgets together.
    pub finetune_epochs: usize,
    pub seed: u64,
    /// Where the stores, reports and plots stay; None: a temporary folder removed at the end.
    pub out: Option<PathBuf>,
    pub device: Device,
    pub precision: Precision,
}

static WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit.safetensors");
static INPUT: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit_input.npy");
static TIMM_FEATURES: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit_features.npy");

/// Largest |ours − timm| of the engine check that the demo accepts.
const ENGINE_TOLERANCE: f32 = 1e-4;

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

/// Points of average AUROC that changing only the order of floating-point sums in the gradients
/// moved (b) by in this demo's history (94.18 -> 91.95, README): a gap below it says nothing.
const ROUNDING_POINTS: f64 = 2.23;

/// What the comparison of (a) and (b) can and cannot say, printed after the tables.
pub fn at_this_scale(gap: f64, train_images: usize, depth: usize) -> String {
    let scale = format!("{train_images} training digits of 8x8 pixels and a {depth}-block model");
    if gap.abs() <= ROUNDING_POINTS {
        format!(
            "At this scale ({scale}) the gap of {gap:+.2} points between (a) and (b) is within what \
             the order of floating-point sums alone moves (up to {ROUNDING_POINTS} points here), so it \
             neither supports nor refutes MOOD, whose claim is about large pretraining on natural images."
        )
    } else {
        format!(
            "The gap of {gap:+.2} points between (a) and (b) is larger than what the order of \
             floating-point sums moves here (up to {ROUNDING_POINTS} points), but {scale} are far \
             from the large pretraining on natural images that MOOD's claim is about."
        )
    }
}

/// MOOD's detector (mahalanobis) in a report: its average AUROC in points, NaN when absent.
pub fn mahalanobis_auroc(r: &Report) -> f64 {
    r.methods
        .iter()
        .find(|m| m.method == "mahalanobis")
        .map_or(f64::NAN, |m| 100.0 * m.average.auroc)
}

/// `--out` must be new, empty, or the output of an earlier demo (only its `mim` and `scratch`
/// folders), so that the demo never writes its stores into someone else's files.
fn check_out(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        if out.exists() {
            return Err(Error::Usage(format!(
                "--out {}: not a folder; choose a new or empty one",
                out.display()
            )));
        }
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name != "mim" && name != "scratch" {
            return Err(Error::Usage(format!(
                "--out {} holds {}, which is not an earlier demo's output: choose a new or empty folder",
                out.display(),
                name.to_string_lossy()
            )));
        }
    }
    Ok(())
}

/// ODIN's (temperature, epsilon): the defaults of `mood extract --odin`.
const ODIN: (f32, f32) = (1000.0, 0.0014);

/// How the demo's images were rendered, for the stores' manifests.
const PREPROCESS: &str = "digits: 8x8 nearest upsampled, mean/std 0.5";

/// Images per training step of both models.
const BATCH: usize = 32;

fn schedule(epochs: usize, layer_decay: f32, seed: u64) -> Schedule {
    Schedule {
        epochs,
        batch: BATCH,
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

/// The demo's images: the ID train and test splits and the OOD sets by name.
pub struct Sets {
    pub train: Dataset,
    pub id_test: Dataset,
    pub ood: Vec<(&'static str, Vec<f32>)>,
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

/// A demo ready to train: its options checked, the engine compared with timm, the device open and
/// the images rendered.
pub struct Demo {
    pub opts: Options,
    pub on: TrainOn,
    pub cfg: VitConfig,
    pub sets: Sets,
    /// Max |ours − timm| of the engine check (refused by `check_engine` past its tolerance).
    pub engine_diff: f32,
    /// Where the stores go (`--out`, or a temporary folder).
    pub root: PathBuf,
}

/// Both trained models' parameters, and (a)'s reconstruction loss per epoch.
pub struct Trained {
    pub mim: BTreeMap<String, Tensor>,
    pub scratch: BTreeMap<String, Tensor>,
    pub mim_history: Vec<f32>,
}

/// One model's outcome: its title, ID test accuracy and OOD report.
pub struct Outcome {
    pub title: String,
    pub accuracy: f32,
    pub report: Report,
}

impl Demo {
    /// Checks the options and `--out`, runs the engine check, opens the device and renders the
    /// data (the engine's verdict is `check_engine`, after the caller has shown the figure).
    pub fn prepare(opts: Options) -> Result<Demo> {
        if opts.pretrain_epochs == 0 || opts.finetune_epochs == 0 {
            return Err(Error::Usage(
                "--pretrain-epochs and --finetune-epochs must be at least 1".into(),
            ));
        }
        if let Some(out) = &opts.out {
            check_out(out)?;
        }
        let engine_diff = engine_check()?;
        let on = super::device::train_on(opts.device, opts.precision, "running the demo")?;
        let cfg = VitConfig::preset("beit_tiny_patch8_32")?;
        let sets = data(cfg.img_size, opts.seed)?;
        let root = match &opts.out {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("mood-demo-{}", std::process::id())),
        };
        Ok(Demo {
            opts,
            on,
            cfg,
            sets,
            engine_diff,
            root,
        })
    }

    /// Where the models train and are extracted, in words.
    pub fn place(&self) -> String {
        match &self.on {
            TrainOn::Cpu => "CPU".to_string(),
            #[cfg(feature = "cuda")]
            TrainOn::Cuda { .. } => format!("{} for training and extraction", self.on.describe()),
        }
    }

    /// Refuses an engine that differs from timm past the tolerance.
    pub fn check_engine(&self) -> Result<()> {
        let diff = self.engine_diff;
        if diff > ENGINE_TOLERANCE {
            return Err(Error::Data(format!(
                "engine output differs from timm by {diff:.2e} (> 1e-4)"
            )));
        }
        Ok(())
    }

    /// Whether the stores stay (`--out`) or are removed at the end.
    pub fn keeps_output(&self) -> bool {
        self.opts.out.is_some()
    }

    /// Each OOD set's name and number of images.
    pub fn ood_counts(&self) -> Vec<(&'static str, usize)> {
        let per_image = 3 * self.cfg.img_size * self.cfg.img_size;
        self.sets
            .ood
            .iter()
            .map(|(n, v)| (*n, v.len() / per_image))
            .collect()
    }

    /// Optimizer steps of both models together (for a progress display).
    pub fn total_steps(&self) -> u64 {
        let (p, f) = (self.opts.pretrain_epochs, self.opts.finetune_epochs);
        let steps = |e: usize| (e * (self.sets.train.len() / BATCH)) as u64;
        steps(p) + steps(f) + steps(p + f)
    }

    /// Trains (a) MIM then fine-tuning and (b) fine-tuning from scratch for the same budget,
    /// from one random initialisation; `on_step` is the training loops' per-step callback.
    pub fn train(&self, on_step: &mut OnStep) -> Result<Trained> {
        let (cfg, on, seed) = (&self.cfg, &self.on, self.opts.seed);
        let (p, f) = (self.opts.pretrain_epochs, self.opts.finetune_epochs);
        let train = &self.sets.train;
        let store = crate::model::init::random_store(cfg, seed);
        let init = store.float_tensors()?;

        // (a) MOOD: masked image modelling on the ID images, then fine-tuning.
        let mut mim = init.clone();
        mim.retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
        add_mim_params(&mut mim, cfg, seed);
        let mim_history = pretrain_on(
            on,
            cfg,
            &mut mim,
            train,
            &schedule(p, 1.0, seed),
            0.4,
            None,
            None,
            on_step,
        )?;
        prepare_for_finetune(&mut mim, cfg, 5, seed);
        finetune_on(
            on,
            cfg,
            &mut mim,
            train,
            &schedule(f, 0.9, seed),
            0.1,
            None,
            None,
            on_step,
        )?;

        // (b) the same budget of supervised training from scratch.
        let mut scratch = init;
        prepare_for_finetune(&mut scratch, cfg, 5, seed);
        finetune_on(
            on,
            cfg,
            &mut scratch,
            train,
            &schedule(p + f, 1.0, seed),
            0.1,
            None,
            None,
            on_step,
        )?;
        Ok(Trained {
            mim,
            scratch,
            mim_history,
        })
    }

    /// Extracts and evaluates both models (under `root`/mim and `root`/scratch), then removes
    /// `root` unless `--out` keeps it.
    pub fn evaluate(&self, trained: &Trained) -> Result<Vec<Outcome>> {
        let (p, f) = (self.opts.pretrain_epochs, self.opts.finetune_epochs);
        let runs = [
            (
                "mim",
                format!("(a) MIM {p} ep -> fine-tune {f} ep"),
                &trained.mim,
            ),
            (
                "scratch",
                format!("(b) fine-tune {} ep from scratch", p + f),
                &trained.scratch,
            ),
        ];
        let mut results = Vec::new();
        for (dir, title, params) in runs {
            let (accuracy, report) = self.evaluate_one(params, &self.root.join(dir))?;
            results.push(Outcome {
                title,
                accuracy,
                report,
            });
        }
        if !self.keeps_output() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
        Ok(results)
    }

    /// Extracts every set into stores under `dir` and evaluates every method on them.
    fn evaluate_one(&self, params: &BTreeMap<String, Tensor>, dir: &Path) -> Result<(f32, Report)> {
        let (on, cfg, sets) = (&self.on, &self.cfg, &self.sets);
        let store = WeightStore::from_params("<demo model>", params);
        let model = Backbone::Vit(Box::new(VisionTransformer::load(cfg, &store)?));
        let extract = |images: &[f32], labels: Option<&[usize]>, sub: &Path, name: &str, odin| {
            super::extract::from_memory(on, &model, images, labels, sub, name, PREPROCESS, odin)
        };
        // ODIN fits nothing: the train set needs no scores.
        extract(
            &sets.train.images,
            Some(&sets.train.labels),
            &dir.join("train"),
            "digits 0-4, train split",
            None,
        )?;
        extract(
            &sets.id_test.images,
            Some(&sets.id_test.labels),
            &dir.join("id"),
            "digits 0-4, test split",
            Some(ODIN),
        )?;
        let mut oods = Vec::new();
        for (name, images) in &sets.ood {
            let sub = dir.join(name.split(' ').next().unwrap_or("ood"));
            extract(images, None, &sub, name, Some(ODIN))?;
            oods.push((name.to_string(), sub));
        }
        let open = crate::store::FeatureStore::open;
        let ood_stores = oods
            .iter()
            .map(|(_, d)| open(d))
            .collect::<Result<Vec<_>>>()?;
        // MOS needs a group-softmax head, which this model does not have.
        let names: Vec<&'static str> = METHODS
            .iter()
            .map(|m| m.name)
            .filter(|&n| n != "mos")
            .collect();
        let cpu = super::score_device::ScoreDevice::cpu();
        let plan = super::eval::Plan {
            device: &cpu,
            names: &names,
            method_args: &[],
            head: None,
            rules: Default::default(),
            skip_missing: true,
            plots: Some(dir),
        };
        let report = super::eval::evaluate(
            &plan,
            &open(&dir.join("train"))?,
            &open(&dir.join("id"))?,
            &oods,
            &ood_stores,
        )?;
        report.write(dir)?;
        Ok((accuracy(cfg, params, &sets.id_test, 256)?, report))
    }
}
