//! `mood fit` (a detector from an ID train store) and `mood score` (a detector over any store);
//! the runs are pipeline::fit.

use std::path::PathBuf;

use crate::backend::Device;
use crate::error::Result;
use crate::pipeline::fit::{fit, score, FitRequest, ScoreRequest};

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
    let fitted = fit(&FitRequest {
        method: &args.method,
        method_args: &args.method_args,
        train: &args.train,
        head: args.head.as_deref(),
        output: &args.output,
        device: args.device,
    })?;
    eprintln!(
        "fitted {} on {} rows of {} in {:.2} s -> {}",
        fitted.method,
        fitted.rows,
        args.train.display(),
        fitted.seconds,
        args.output.display()
    );
    Ok(())
}

pub fn run_score(args: ScoreArgs) -> Result<()> {
    let scored = score(&ScoreRequest {
        detector: &args.detector,
        features: &args.features,
        output: &args.output,
        device: args.device,
        allow_mismatch: args.allow_mismatch,
    })?;
    eprintln!(
        "{} scores of {} rows on the {} in {:.2} s -> {}",
        scored.method,
        scored.rows,
        if scored.on_gpu { "GPU" } else { "CPU" },
        scored.seconds,
        args.output.display()
    );
    Ok(())
}
