//! `mood fit` (a detector from an ID train store) and `mood score` (a detector over any store).

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::Device;
use crate::error::Result;
use crate::ood::detector::{method, parse_args, Detector};
use crate::pipeline::eval::{load_head, refuse_empty};
use crate::pipeline::provenance;
use crate::pipeline::score_device::ScoreDevice;
use crate::store::FeatureStore;

#[derive(clap::Args, Debug)]
pub struct FitArgs {
    /// Score function (`mood eval --help` or any wrong name lists them all).
    #[arg(long)]
    pub method: String,
    /// A setting of the method, key=value (repeatable), e.g. k=50, t=1000, percentile=0.9.
    #[arg(long = "method-arg", value_name = "KEY=VALUE")]
    pub method_args: Vec<String>,
    /// ID train feature store (from `mood extract`).
    #[arg(long)]
    pub train: PathBuf,
    /// Linear head (head.weight, head.bias) when the store has none.
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// Detector file to write (safetensors).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Fits (means, covariances, pseudo-inverses in f64) run on the CPU: cpu, or auto (with a
    /// note); cuda is refused. `mood score --device cuda` scores on the GPU.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// Detector written by `mood fit`.
    #[arg(long)]
    pub detector: PathBuf,
    /// Feature store to score.
    #[arg(long)]
    pub features: PathBuf,
    /// Scores to write (.npy, float32, higher = more in-distribution).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Where to score: cpu, cuda (mahalanobis, mood-v1, gauss, mahalanobis-cc and knn on the
    /// GPU, in f32), or auto (cuda if a device is usable, else cpu with a note).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Score even when the detector's train store and this store come from another model,
    /// weights or preprocessing (refused otherwise).
    #[arg(long)]
    pub allow_mismatch: bool,
}

pub fn run_fit(args: FitArgs) -> Result<()> {
    crate::pipeline::device::cpu_only(args.device, "fitting", "f64 statistics on the host")?;
    let m = method(&args.method)?;
    let settings = parse_args(m, &args.method_args)?;
    crate::fsutil::refuse_inside(&args.output, "-o", &args.train, "the train store")?;
    let head = load_head(args.head.as_deref())?;
    let store = FeatureStore::open(&args.train)?;
    refuse_empty(&store, "--train", &args.train)?;
    provenance::say_notes(&store);
    let t = Instant::now();
    let det = Detector::fit(m.name, settings, &store.inputs(head.as_ref()))?;
    det.save(&args.output)?;
    let mut prov = store.manifest.provenance();
    prov.dim = store.dim();
    provenance::stamp_detector(&args.output, &prov)?;
    eprintln!(
        "fitted {} on {} rows of {} in {:.2} s -> {}",
        m.name,
        store.rows(),
        args.train.display(),
        t.elapsed().as_secs_f64(),
        args.output.display()
    );
    Ok(())
}

pub fn run_score(args: ScoreArgs) -> Result<()> {
    crate::fsutil::refuse_inside(&args.output, "-o", &args.features, "the store")?;
    let det = Detector::load(&args.detector)?;
    let store = FeatureStore::open(&args.features)?;
    provenance::say_notes(&store);
    match provenance::detector_provenance(&args.detector)? {
        Some(trained) => {
            let mut prov = store.manifest.provenance();
            prov.dim = store.dim();
            let d = format!("--detector {}", args.detector.display());
            let f = format!("--features {}", args.features.display());
            provenance::compare(&trained, &d, &prov, &f, args.allow_mismatch)?;
        }
        None if !crate::progress::quiet() => eprintln!(
            "note: {} records no train store provenance (an older mood): not compared with {}",
            args.detector.display(),
            args.features.display()
        ),
        None => {}
    }
    let device = ScoreDevice::open(args.device)?;
    device.note_cpu_methods(&[det.method()]);
    let t = Instant::now();
    let scorer = device.prepare(&det)?;
    let scores = scorer.score(&store.inputs(None))?;
    crate::npy::write_f32(&args.output, &[scores.len()], &scores)?;
    eprintln!(
        "{} scores of {} rows on the {} in {:.2} s -> {}",
        det.method(),
        scores.len(),
        if scorer.on_gpu() { "GPU" } else { "CPU" },
        t.elapsed().as_secs_f64(),
        args.output.display()
    );
    Ok(())
}
