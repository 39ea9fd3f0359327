//! `mood extract` (images → feature store, resumable, shardable) and `mood merge` (shards → one
//! store in source order).

use std::path::{Path, PathBuf};

use super::bench::{Device, Precision};
use crate::error::{Error, Result};
use crate::extract::{self, source, Options, Source};
use crate::store::Manifest;

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

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::Usage(format!(
            "--shard `{s}`: expected i/N with 0 <= i < N, e.g. 3/8"
        ))
    };
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (
        i.parse::<usize>().map_err(|_| bad())?,
        n.parse::<usize>().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

pub fn open_source(spec: &str, preset: &str, img_size: usize) -> Result<(Box<dyn Source>, String)> {
    if spec == "digits" || spec.starts_with("digits:") || spec.starts_with("digits@") {
        let s = source::Digits::parse(spec, img_size)?;
        return Ok((
            Box::new(s),
            "digits: 8x8 nearest-upsampled, mean/std 0.5".into(),
        ));
    }
    if let Some(cifar) = crate::data::cifar::parse_spec(spec) {
        let s = source::Cifar::open(&cifar?, preset, img_size)?;
        let p = crate::data::Preprocess::preset(preset, img_size)?;
        return Ok((Box::new(s), format!("{preset}: {p:?}")));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        let s = source::Folder::open(path, preset, img_size)?;
        let p = crate::data::Preprocess::preset(preset, img_size)?;
        return Ok((Box::new(s), format!("{preset}: {p:?}")));
    }
    if spec.contains('/') || path.exists() {
        return Err(Error::Usage(format!("--data {spec}: no such directory")));
    }
    Err(Error::Usage(format!(
        "--data `{spec}`: not a directory or a known data set (digits[:CLASSES][@train|@test], \
         cifar10:DIR[@train|@test], cifar100:DIR[@train|@test])"
    )))
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
    let device = args.device;
    if args.batch == 0 || args.chunk == 0 {
        return Err(Error::Usage(
            "--batch and --chunk must be at least 1".into(),
        ));
    }
    let model = super::load_model(&args.arch, &args.weights)?;
    let (source, preprocess) = open_source(&args.data, &args.preset, model.img_size())?;
    if source.is_empty() {
        return Err(Error::Data(format!("--data `{}` has no images", args.data)));
    }
    // The largest batch actually run (batches never span chunks): a smaller one needs less
    // device memory.
    let largest = args.batch.min(args.chunk).min(source.len()).max(1);
    let (mut runner, described) =
        super::runner::runner_described(&model, device, args.precision, largest)?;
    let (device_kind, device_name) = match described.split_once(':') {
        Some((kind, name)) => (kind.trim(), name.trim().to_string()),
        None => (described.as_str(), crate::backend::cpu::describe()),
    };
    let weights_sha256 = crate::fsutil::sha256_file(&args.weights)?;
    let manifest = Manifest {
        model: args.arch.clone(),
        weights: args.weights.display().to_string(),
        weights_sha256: weights_sha256.clone(),
        preprocess: preprocess.clone(),
        sources: vec![args.data.clone()],
        dtype: args.dtype.clone(),
        odin,
        identity: Some(crate::store::Identity {
            arch: args.arch.clone(),
            weights_sha256,
            preprocess,
            // The CPU forward is f32 whatever --precision says.
            precision: if device_kind == "cpu" {
                "f32".into()
            } else {
                format!("{:?}", args.precision).to_lowercase()
            },
            device: device_kind.to_string(),
            device_name: device_name.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // ODIN runs where the features do (its tape needs the same executor kind).
    let odin_on = match (odin, device_kind) {
        (Some(_), "cuda") => super::train_common::open_cuda(args.precision)?,
        _ => crate::train::device::TrainOn::Cpu,
    };
    let opts = Options {
        batch: args.batch,
        chunk: args.chunk,
        shard,
        local: args.local,
        layers,
        odin,
        odin_on,
        overwrite: args.overwrite,
    };
    let s = extract::extract(
        &model,
        &mut *runner,
        source.as_ref(),
        &args.out,
        &opts,
        manifest,
    )?;
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

/// `--layers 4,8,12`: block numbers, increasing, each once (their range is checked against the
/// model).
fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let bad = || {
        Error::Usage(format!(
            "--layers {s}: expected block numbers from 1, increasing, e.g. 4,8,12"
        ))
    };
    let v: Vec<usize> = s
        .split(',')
        .map(|b| b.trim().parse::<usize>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if v.is_empty() || v[0] == 0 || v.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad());
    }
    Ok(v)
}

/// `T,EPS` of `--odin`: a positive temperature and a non-negative input step.
fn parse_odin(s: &str) -> Result<(f32, f32)> {
    let bad = || {
        Error::Usage(format!(
            "--odin {s}: expected T,EPS with T > 0 and EPS >= 0, e.g. 1000,0.0014"
        ))
    };
    let (t, e) = s.split_once(',').ok_or_else(bad)?;
    let (t, e): (f32, f32) = (
        t.trim().parse().map_err(|_| bad())?,
        e.trim().parse().map_err(|_| bad())?,
    );
    if !(t.is_finite() && t > 0.0 && e.is_finite() && e >= 0.0) {
        return Err(bad());
    }
    Ok((t, e))
}
