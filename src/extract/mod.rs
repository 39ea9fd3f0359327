//! Feature extraction: a data source through a model into a feature store, in chunks that survive
//! a kill. Every `chunk` rows of this shard go through the model and land in
//! `OUT/.partial/chunk-NNNNNN.safetensors` (written atomically); a rerun skips the chunks already
//! there, so a killed run resumes. When all chunks exist they are concatenated into the store's
//! files, the manifest is written last and `.partial` removed. The output depends only on the
//! source, model, chunking and shard, so a resumed run writes the same bytes as an uninterrupted one.
//!
//! Batches are decoded and preprocessed on a loader thread while the model runs on the previous
//! one. An image that cannot be read is skipped with a warning and listed in the manifest.
//! `--shard i/N` takes the rows whose index mod N == i; `merge` joins shards in source order
//! through the per-row source index kept in `index.npy`.
//!
//! The manifest records the run's identity (`store::Identity`) before the first chunk: a rerun
//! resumes only a run of the same identity, and says so in one line otherwise (`state`). One
//! process writes a store at a time (a `.lock` file with its pid).

pub mod merge;
pub mod odin;
pub mod odin_resnet;
pub mod source;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::backbone::Backbone;
use crate::model::runner::Runner;
use crate::store::{Manifest, Skipped};
use crate::tensor::Tensor;
use crate::weights::{safetensors, RawTensor, WDType, WeightStore};

pub use source::Source;

pub struct Options {
    pub batch: usize,
    /// Rows per chunk file (a multiple of `batch` keeps batches whole).
    pub chunk: usize,
    /// (i, N): this run takes the rows with index mod N == i.
    pub shard: (usize, usize),
    /// Also keep the last block's patch tokens (local.npy).
    pub local: bool,
    /// (temperature, epsilon): also score every image by ODIN through the model (odin.npy),
    /// on `odin_on` (the device the features come from).
    pub odin: Option<(f32, f32)>,
    pub odin_on: crate::train::device::TrainOn,
    /// Block numbers whose mean patch token to keep (layers.npy [n, L, D]), from the same
    /// forward; empty: none.
    pub layers: Vec<usize>,
    /// Replace whatever store or unfinished run of another identity is in the output.
    pub overwrite: bool,
}

/// What one run did, for the closing line.
pub struct Summary {
    pub rows: usize,
    /// Images read and run through the model by this run (not counting resumed chunks).
    pub processed: usize,
    pub skipped: usize,
    pub chunks_reused: usize,
    pub seconds: f64,
    /// Seconds inside the model's forward.
    pub model_seconds: f64,
    /// The store was already finished by an earlier run of the same identity: nothing was done.
    pub already_complete: bool,
}

struct Chunk {
    index: Vec<i64>,
    labels: Vec<i64>,
    features: Vec<f32>,
    logits: Vec<f32>,
    local: Vec<f32>,
    odin: Vec<f32>,
    layers: Vec<f32>,
    skipped: Vec<Skipped>,
}

fn raw_f32(name: &str, shape: Vec<usize>, v: &[f32]) -> RawTensor {
    RawTensor {
        name: name.into(),
        dtype: WDType::F32,
        shape,
        data: bytemuck::cast_slice(v).to_vec(),
    }
}

fn raw_i64(name: &str, v: &[i64]) -> RawTensor {
    RawTensor {
        name: name.into(),
        dtype: WDType::I64,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn save_chunk(
    path: &Path,
    c: &Chunk,
    d: usize,
    classes: usize,
    tokens: usize,
    blocks: usize,
) -> Result<()> {
    let n = c.index.len();
    let mut t = vec![
        raw_i64("index", &c.index),
        raw_i64("labels", &c.labels),
        raw_f32("features", vec![n, d], &c.features),
    ];
    if classes > 0 {
        t.push(raw_f32("logits", vec![n, classes], &c.logits));
    }
    if tokens > 0 {
        t.push(raw_f32("local", vec![n, tokens, d], &c.local));
    }
    if blocks > 0 {
        t.push(raw_f32("layers", vec![n, blocks, d], &c.layers));
    }
    if c.odin.len() == n && n > 0 {
        t.push(raw_f32("odin", vec![n], &c.odin));
    }
    let meta = HashMap::from([(
        "skipped".to_string(),
        serde_json::to_string(&c.skipped).map_err(|e| Error::Data(e.to_string()))?,
    )]);
    safetensors::write(path, &t, Some(meta))
}

/// A chunk file as its tensors (f32 data, i64 index/labels) and skipped list.
pub(crate) struct LoadedChunk {
    pub store: WeightStore,
    pub index: Vec<i64>,
    pub labels: Vec<i64>,
    pub skipped: Vec<Skipped>,
}

pub(crate) fn load_chunk(path: &Path) -> Result<LoadedChunk> {
    let store = WeightStore::open(path)?;
    let ints = |name: &str| {
        store
            .get_i64(name)
            .ok_or_else(|| Error::format(path, format!("chunk has no integer `{name}`")))
    };
    let (index, labels) = (ints("index")?, ints("labels")?);
    let skipped = match safetensors::read_metadata(path, "skipped")? {
        Some(s) => serde_json::from_str(&s).map_err(|e| Error::format(path, e.to_string()))?,
        None => Vec::new(),
    };
    Ok(LoadedChunk {
        store,
        index,
        labels,
        skipped,
    })
}

/// The rows of this shard, split into chunks.
fn plan(len: usize, opts: &Options) -> Vec<Vec<usize>> {
    let (i, n) = opts.shard;
    let rows: Vec<usize> = (0..len).filter(|r| r % n == i).collect();
    rows.chunks(opts.chunk.max(1)).map(|c| c.to_vec()).collect()
}

/// Runs `source` through `runner` (`model` on the CPU or a GPU) into the store at `out`; ODIN's
/// scores come from `model` on the CPU (they need the input gradient). `manifest` carries
/// the model, weights and source descriptions, and in `identity` the arch, weights hash,
/// preprocessing, precision and device; the rest of the identity, counts, classes and skipped
/// files are filled in here.
pub fn extract(
    model: &Backbone,
    runner: &mut dyn Runner,
    source: &dyn Source,
    out: &Path,
    opts: &Options,
    mut manifest: Manifest,
) -> Result<Summary> {
    let (si, sn) = opts.shard;
    if sn == 0 || si >= sn {
        return Err(Error::Usage(format!(
            "--shard {si}/{sn}: expected i/N with i < N"
        )));
    }
    if opts.batch == 0 || opts.chunk == 0 {
        return Err(Error::Usage(
            "--batch and --chunk must be at least 1".into(),
        ));
    }
    let (chans, size) = (model.in_chans(), model.img_size());
    let sample = source.sample_len();
    if sample != chans * size * size {
        return Err(Error::Usage(format!(
            "the source gives {sample}-value images, {} takes {chans}x{size}x{size}",
            model.name()
        )));
    }
    let d = model.feature_dim();
    let classes = model.num_classes().unwrap_or(0);
    // The per-block hook is in the transformer's forward (vit.rs), on whichever executor the
    // runner drives; ResNet and BiT have none yet.
    if !opts.layers.is_empty() {
        let Some(vit) = model.as_vit() else {
            return Err(Error::Usage(format!(
                "--layers: per-block features are the mean patch tokens of a transformer's blocks; {} is a ResNet, whose forward has no per-stage hook yet",
                model.name()
            )));
        };
        let depth = vit.blocks.len();
        if let Some(l) = opts.layers.iter().find(|&&l| l == 0 || l > depth) {
            return Err(Error::Usage(format!(
                "--layers: block {l} does not exist; {} has blocks 1..={depth}",
                model.name()
            )));
        }
    }
    let odin_model = match (opts.odin, model.as_vit()) {
        (Some(_), None) if !matches!(model, Backbone::ResNet(_)) => {
            return Err(Error::Usage(format!(
            "--odin: ODIN runs through the transformer's training tape, which {} does not have yet",
            model.name()
        )))
        }
        (_, vit) => vit,
    };
    // A ResNet's ODIN runs through its CPU backward (odin_resnet.rs).
    let odin_resnet = match (opts.odin, model) {
        (Some(_), Backbone::ResNet(r)) => {
            if !matches!(opts.odin_on, crate::train::device::TrainOn::Cpu) {
                return Err(Error::Usage(
                    "--odin on a ResNet runs on the CPU only for now; use --device cpu".into(),
                ));
            }
            Some(r.as_ref())
        }
        _ => None,
    };
    let mut odin_exec = odin_model.map(|vit| odin::OdinExec::new(&opts.odin_on, vit));
    let mut id = manifest.identity.take().unwrap_or_default();
    id.mood_version = env!("CARGO_PKG_VERSION").into();
    (id.source_rows, id.source_sha256) = source::listing(source);
    id.shard = opts.shard;
    id.chunk = opts.chunk;
    id.batch = opts.batch;
    id.logits = classes > 0;
    id.local = opts.local;
    id.odin = opts.odin;
    id.layers = opts.layers.clone();
    manifest.layers = opts.layers.clone();
    id.dtype = if manifest.dtype.is_empty() {
        "f32".into()
    } else {
        manifest.dtype.clone()
    };
    manifest.identity = Some(id.clone());
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _lock = crate::fsutil::Lock::acquire(&out.join(".lock"), out)?;
    let partial = out.join(".partial");
    let stale = crate::fsutil::remove_stale_temps(out, None)
        + crate::fsutil::remove_stale_temps(&partial, None);
    if stale > 0 && !crate::progress::quiet() {
        eprintln!(
            "note: {}: removed {stale} temporary file(s) left by an interrupted run",
            out.display()
        );
    }
    match state::begin(out, &id, opts.overwrite)? {
        state::Start::Complete(m) => {
            return Ok(Summary {
                rows: m.count,
                processed: 0,
                skipped: m.skipped.len(),
                chunks_reused: 0,
                seconds: 0.0,
                model_seconds: 0.0,
                already_complete: true,
            })
        }
        state::Start::Fresh => {
            // The identity goes on disk before the first chunk, so a rerun knows whose chunks
            // these are; `complete: false` marks the store unfinished for every reader.
            let mut m = manifest.clone();
            m.complete = false;
            crate::store::write_manifest(out, &m)?;
        }
        state::Start::Resume => {}
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    let chunks = plan(source.len(), opts);
    let tokens = if opts.local { model.local_tokens() } else { 0 };
    let chunk_path = |k: usize| partial.join(format!("chunk-{k:06}.safetensors"));
    let todo: Vec<usize> = (0..chunks.len())
        .filter(|&k| !chunk_path(k).exists())
        .collect();
    let reused = chunks.len() - todo.len();
    let total_rows: usize = todo.iter().map(|&k| chunks[k].len()).sum();
    let bar = crate::progress::Progress::new(total_rows as u64, "images", "extract");
    let t0 = Instant::now();
    let mut model_seconds = 0.0;
    // Batches of (chunk, batch rows) in order; the loader thread runs one batch ahead.
    let batches: Vec<(usize, Vec<usize>)> = todo
        .iter()
        .flat_map(|&k| chunks[k].chunks(opts.batch).map(move |b| (k, b.to_vec())))
        .collect();
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<(usize, Vec<usize>, Vec<f32>, Vec<Result<()>>)>(1);
        let loader = scope.spawn(move || {
            for (k, rows) in batches {
                let mut buf = vec![0.0f32; rows.len() * sample];
                let results = source.load(&rows, &mut buf);
                if tx.send((k, rows, buf, results)).is_err() {
                    break; // the consumer stopped on an error
                }
            }
        });
        let mut current: Option<(usize, Chunk)> = None;
        // Fault injection for the restart tests: abort (no unwinding, no cleanup, as a kill)
        // after this many chunks of this run are on disk.
        let fault_after: Option<usize> = std::env::var("MOOD_FAULT_AFTER_CHUNKS")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut written = 0usize;
        let mut finish = |k: usize, c: Chunk| -> Result<()> {
            save_chunk(&chunk_path(k), &c, d, classes, tokens, opts.layers.len())?;
            written += 1;
            if fault_after == Some(written) {
                std::process::abort();
            }
            Ok(())
        };
        for (k, rows, buf, results) in rx {
            if current.as_ref().is_some_and(|(ck, _)| *ck != k) {
                let (ck, c) = current.take().expect("checked");
                finish(ck, c)?;
            }
            let chunk = &mut current
                .get_or_insert_with(|| {
                    (
                        k,
                        Chunk {
                            index: vec![],
                            labels: vec![],
                            features: vec![],
                            logits: vec![],
                            local: vec![],
                            odin: vec![],
                            layers: vec![],
                            skipped: vec![],
                        },
                    )
                })
                .1;
            // The readable images, moved up over the skipped ones in place: the batch buffer
            // becomes the model's input without a second copy.
            let mut good = Vec::new();
            let mut images = buf;
            for (i, (&r, res)) in rows.iter().zip(results).enumerate() {
                match res {
                    Ok(()) => {
                        let w = good.len();
                        if w != i {
                            images.copy_within(i * sample..(i + 1) * sample, w * sample);
                        }
                        good.push(r);
                    }
                    Err(e) => {
                        bar.suspend(|| eprintln!("warning: skipping {}: {e}", source.item_name(r)));
                        chunk.skipped.push(Skipped {
                            path: source.item_name(r),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            images.truncate(good.len() * sample);
            if !good.is_empty() {
                let x = Tensor::from_vec(&[good.len(), chans, size, size], images)?;
                let t = Instant::now();
                let (o, local) = if !opts.layers.is_empty() {
                    // One forward with the per-block hook, on the runner's device.
                    let (o, l, per_block) = runner.forward_layers(&x, &opts.layers, opts.local)?;
                    chunk.layers.extend_from_slice(per_block.as_slice());
                    (o, l)
                } else if opts.local {
                    let (o, l) = runner.forward_local(&x)?;
                    (o, Some(l))
                } else {
                    (runner.forward(&x)?, None)
                };
                if let (Some((temp, eps)), Some(vit), Some(ex)) =
                    (opts.odin, odin_model, odin_exec.as_mut())
                {
                    // ODIN needs the input gradient: the training tape on the same device.
                    chunk.odin.extend(ex.scores(vit, &x, temp, eps)?);
                }
                if let (Some((temp, eps)), Some(r)) = (opts.odin, odin_resnet) {
                    chunk.odin.extend(odin_resnet::scores(r, &x, temp, eps)?);
                }
                model_seconds += t.elapsed().as_secs_f64();
                chunk.features.extend_from_slice(o.features.as_slice());
                if let Some(z) = &o.logits {
                    chunk.logits.extend_from_slice(z.as_slice());
                }
                if let Some(l) = local {
                    chunk.local.extend_from_slice(l.as_slice());
                }
                for &r in &good {
                    chunk.index.push(r as i64);
                    chunk.labels.push(source.label(r).map_or(-1, |l| l as i64));
                }
            }
            bar.inc(rows.len() as u64);
        }
        if let Some((k, c)) = current.take() {
            finish(k, c)?;
        }
        loader
            .join()
            .map_err(|_| Error::Data("the image loader thread panicked".into()))?;
        Ok(())
    })?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    manifest.classes = source.classes();
    if sn > 1 {
        manifest.sources.push(format!("shard {si}/{sn}"));
    }
    let paths: Vec<PathBuf> = (0..chunks.len()).map(chunk_path).collect();
    let head = model.store_head();
    let (rows, skipped) = merge::assemble(
        &paths,
        &chunks,
        out,
        head.as_ref(),
        manifest,
        merge::Columns {
            tokens,
            odin: opts.odin.is_some(),
            layers: !opts.layers.is_empty(),
        },
    )?;
    std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    Ok(Summary {
        rows,
        processed: total_rows,
        skipped,
        chunks_reused: reused,
        seconds,
        model_seconds,
        already_complete: false,
    })
}
