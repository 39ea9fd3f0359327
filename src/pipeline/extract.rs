//! The extraction run: a model and a source into a feature store. `mood extract` (a checkpoint
//! and a data spec, `run`) and `mood demo` (a model it trained and images in memory,
//! `from_memory`) both end in `model_to_store`, the one path through extract::extract.

use std::path::Path;

use crate::backend::{Device, Precision};
use crate::error::{Error, Result};
use crate::extract::{self, Options, Source, Summary};
use crate::model::backbone::Backbone;
use crate::model::runner::Runner;
use crate::model::VisionTransformer;
use crate::store::Manifest;
use crate::train::device::TrainOn;

/// What `mood extract` asks for, its arguments parsed.
pub struct Request<'a> {
    pub arch: &'a str,
    pub weights: &'a Path,
    /// The data spec (data::spec), as given.
    pub data: &'a str,
    pub preset: &'a str,
    pub out: &'a Path,
    pub batch: usize,
    pub chunk: usize,
    pub shard: (usize, usize),
    pub local: bool,
    pub layers: Vec<usize>,
    pub dtype: &'a str,
    pub device: Device,
    pub precision: Precision,
    pub odin: Option<(f32, f32)>,
    pub overwrite: bool,
}

/// Loads the model, opens the data and extracts it into `req.out` on the device asked for
/// (resumed when an earlier run of the same settings was interrupted).
pub fn run(req: &Request) -> Result<Summary> {
    if req.batch == 0 || req.chunk == 0 {
        return Err(Error::Usage(
            "--batch and --chunk must be at least 1".into(),
        ));
    }
    let model = super::load_model(req.arch, req.weights)?;
    let (source, preprocess) = super::data::open_source(req.data, req.preset, model.img_size())?;
    if source.is_empty() {
        return Err(Error::Data(format!("--data `{}` has no images", req.data)));
    }
    // The largest batch actually run (batches never span chunks): a smaller one needs less
    // device memory.
    let largest = req.batch.min(req.chunk).min(source.len()).max(1);
    let (mut runner, described) =
        super::device::runner_described(&model, req.device, req.precision, largest)?;
    let (device_kind, device_name) = match described.split_once(':') {
        Some((kind, name)) => (kind.trim(), name.trim().to_string()),
        None => (described.as_str(), crate::backend::cpu::describe()),
    };
    let weights_sha256 = crate::fsutil::sha256_file(req.weights)?;
    let manifest = Manifest {
        model: req.arch.to_string(),
        weights: req.weights.display().to_string(),
        weights_sha256: weights_sha256.clone(),
        preprocess: preprocess.clone(),
        sources: vec![req.data.to_string()],
        dtype: req.dtype.to_string(),
        odin: req.odin,
        identity: Some(crate::store::Identity {
            arch: req.arch.to_string(),
            weights_sha256,
            preprocess,
            // The CPU forward is f32 whatever --precision says.
            precision: if device_kind == "cpu" {
                "f32".into()
            } else {
                format!("{:?}", req.precision).to_lowercase()
            },
            device: device_kind.to_string(),
            device_name: device_name.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // ODIN runs where the features do (its tape needs the same executor kind).
    let odin_on = match (req.odin, device_kind) {
        (Some(_), "cuda") => super::device::open_cuda(req.precision)?,
        _ => TrainOn::Cpu,
    };
    let opts = Options {
        batch: req.batch,
        chunk: req.chunk,
        shard: req.shard,
        local: req.local,
        layers: req.layers.clone(),
        odin: req.odin,
        odin_on,
        overwrite: req.overwrite,
    };
    model_to_store(
        &model,
        &mut *runner,
        source.as_ref(),
        req.out,
        &opts,
        manifest,
    )
}

/// The one extraction path: `model` through `runner` over `source` into the store `out`.
pub fn model_to_store(
    model: &Backbone,
    runner: &mut dyn Runner,
    source: &dyn Source,
    out: &Path,
    opts: &Options,
    manifest: Manifest,
) -> Result<Summary> {
    extract::extract(model, runner, source, out, opts, manifest)
}

/// Images per forward of `from_memory`: the demo's sets whole, in the batches its numbers were
/// first recorded with (a batch's size changes the GEMMs' rounding).
const MEMORY_BATCH: usize = 256;

/// A transformer trained in this process over normalised images in memory into the store `dir`
/// (features, logits, labels when given, patch tokens, head, and ODIN scores at `odin`), on the
/// device it trained on: what `mood demo` extracts, through the same path as `mood extract`.
#[allow(clippy::too_many_arguments)]
pub fn from_memory(
    on: &TrainOn,
    model: &Backbone,
    images: &[f32],
    labels: Option<&[usize]>,
    dir: &Path,
    source: &str,
    preprocess: &str,
    odin: Option<(f32, f32)>,
) -> Result<Summary> {
    let vit: &VisionTransformer = model.as_vit().ok_or_else(|| {
        Error::Usage(format!(
            "{}: extraction from memory runs transformers",
            model.name()
        ))
    })?;
    let cfg = &vit.cfg;
    let per = cfg.in_chans * cfg.img_size * cfg.img_size;
    let rows = images.len() / per.max(1);
    let memory = extract::source::InMemory::new(source, images, labels, per)?;
    let manifest = Manifest {
        model: cfg.name.clone(),
        weights: "<trained by mood demo>".into(),
        preprocess: preprocess.into(),
        sources: vec![source.into()],
        odin,
        ..Default::default()
    };
    let opts = Options {
        batch: MEMORY_BATCH,
        // One chunk: the batches are those of one pass over the images.
        chunk: rows.max(1),
        shard: (0, 1),
        local: true,
        layers: Vec::new(),
        odin,
        odin_on: on.clone(),
        overwrite: true,
    };
    let mut runner = super::device::runner_on(vit, on);
    model_to_store(model, &mut *runner, &memory, dir, &opts, manifest)
}

/// `--shard i/N`: this run takes the rows whose index mod N == i.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
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

/// `--layers 4,8,12`: block numbers, increasing, each once (their range is checked against the
/// model).
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
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
pub fn parse_odin(s: &str) -> Result<(f32, f32)> {
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
