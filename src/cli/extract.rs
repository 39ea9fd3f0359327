//! `mood extract` (images → feature store, resumable, shardable) and `mood merge` (shards → one
//! store in source order).

use std::path::PathBuf;

use crate::backend::{Device, Precision};
use crate::error::Result;
use crate::pipeline::extract::{parse_layers, parse_odin, parse_shard, Request};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture preset (see `mood info`).
    #[arg(long)]
    pub arch: String,
    /// Checkpoint (.safetensors or .pth) for the architecture.
    #[arg(long)]
    pub weights: PathBuf,
    /// What to read: an image folder (class sub-folders or flat), `digits[:CLASSES][@train|@test]`,
    /// or `cifar10:DIR[@train|@test]` / `cifar100:DIR[@train|@test]` (python or binary version).
    #[arg(long)]
    pub data: String,
    /// Preprocessing of image folders and CIFAR: mood (256/224 bicubic, mean/std 0.5; BEiT's), moodv2
    /// (square bilinear), imagenet (256/224 bicubic, ImageNet mean/std) or cifar.
    #[arg(long, default_value = "mood")]
    pub preset: String,
    /// Store directory to write (resumed if a previous run was interrupted).
    #[arg(long)]
    pub out: PathBuf,
    /// Images per forward (recorded: a resume must use the same, since a batch's size changes
    /// the GEMMs' rounding).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Rows per on-disk chunk: the work lost to a kill is at most one chunk.
    #[arg(long, default_value_t = 4096)]
    pub chunk: usize,
    /// Take only the rows whose index mod N == i (one machine of N), as i/N.
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Also write the last block's patch tokens (local.npy, for `csd`).
    #[arg(long)]
    pub local: bool,
    /// Also write, from the same forward, the mean patch token of these blocks (1-based,
    /// increasing), e.g. 4,8,12: layers.npy [n, L, D], for `mahalanobis-ensemble` and `gram`.
    /// Transformers only (on any --device).
    #[arg(long, value_name = "B1,B2,...")]
    pub layers: Option<String>,
    /// Element type of features.npy, local.npy and layers.npy (f16 halves the disk; logits stay
    /// f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub dtype: String,
    /// Where to run the model: cpu, cuda, or auto (cuda if a device is usable, else cpu with a
    /// note). The CPU and CUDA features agree to f32 rounding, not bit for bit.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// CUDA only: f32 (features as the CPU's, to f32 rounding) or bf16 (faster, ~1e-2 off).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Also score every image by ODIN through the model (odin.npy, for `mood eval --methods
    /// odin`): temperature and input step, default 1000,0.0014. Costs a backward and a second
    /// forward per batch, on the --device the features run on.
    #[arg(long, value_name = "T,EPS", num_args = 0..=1, default_missing_value = "1000,0.0014")]
    pub odin: Option<String>,
    /// Replace a store (finished or not) in --out that another run made, instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Shard stores written by `mood extract --shard i/N`.
    #[arg(required = true)]
    pub stores: Vec<PathBuf>,
    /// The merged store's directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace a store already in --output.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    let shard = parse_shard(&args.shard)?;
    let odin = args.odin.as_deref().map(parse_odin).transpose()?;
    let layers = args
        .layers
        .as_deref()
        .map(parse_layers)
        .transpose()?
        .unwrap_or_default();
    let s = crate::pipeline::extract::run(&Request {
        arch: &args.arch,
        weights: &args.weights,
        data: &args.data,
        preset: &args.preset,
        out: &args.out,
        batch: args.batch,
        chunk: args.chunk,
        shard,
        local: args.local,
        layers,
        dtype: &args.dtype,
        device: args.device,
        precision: args.precision,
        odin,
        overwrite: args.overwrite,
    })?;
    if s.already_complete {
        eprintln!(
            "{}: already complete ({} rows, made by a run with these settings); nothing to do",
            args.out.display(),
            s.rows
        );
        return Ok(());
    }
    eprintln!(
        "{} rows -> {} in {:.1} s ({:.1} images/s; model busy {:.0}% of the time){}{}",
        s.rows,
        args.out.display(),
        s.seconds,
        s.processed as f64 / s.seconds.max(1e-9),
        100.0 * s.model_seconds / s.seconds.max(1e-9),
        if s.skipped > 0 {
            format!(
                "; {} unreadable files skipped (listed in manifest.json)",
                s.skipped
            )
        } else {
            String::new()
        },
        if s.chunks_reused > 0 {
            format!("; resumed: {} chunks were already done", s.chunks_reused)
        } else {
            String::new()
        },
    );
    Ok(())
}

pub fn run_merge(args: MergeArgs) -> Result<()> {
    let n = crate::extract::merge::merge(&args.stores, &args.output, args.overwrite)?;
    eprintln!(
        "{n} rows from {} stores -> {}",
        args.stores.len(),
        args.output.display()
    );
    Ok(())
}
