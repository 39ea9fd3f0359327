//! The runs of `mood fit` (a detector from an ID train store) and `mood score` (a detector over
//! any store), with their provenance: a detector records the train store it came from, and
//! scoring compares it with the store scored.

use std::path::Path;
use std::time::Instant;

use super::eval::{load_head, refuse_empty};
use super::provenance;
use super::score_device::ScoreDevice;
use crate::backend::Device;
use crate::error::Result;
use crate::ood::detector::{method, parse_args, Detector};
use crate::store::FeatureStore;

/// What `mood fit` is asked for.
pub struct FitRequest<'a> {
    pub method: &'a str,
    /// KEY=VALUE settings of the method, as given.
    pub method_args: &'a [String],
    pub train: &'a Path,
    pub head: Option<&'a Path>,
    pub output: &'a Path,
    pub device: Device,
}

/// What a fit did: the method's name, the rows fitted on and the seconds it took.
pub struct Fitted {
    pub method: &'static str,
    pub rows: usize,
    pub seconds: f64,
}

/// Fits the method on the train store (on the CPU) and writes the detector stamped with the
/// store's provenance.
pub fn fit(req: &FitRequest) -> Result<Fitted> {
    super::device::cpu_only(req.device, "fitting", "f64 statistics on the host")?;
    let m = method(req.method)?;
    let settings = parse_args(m, req.method_args)?;
    crate::fsutil::refuse_inside(req.output, "-o", req.train, "the train store")?;
    let head = load_head(req.head)?;
    let store = FeatureStore::open(req.train)?;
    refuse_empty(&store, "--train", req.train)?;
    provenance::say_notes(&store);
    let t = Instant::now();
    let det = Detector::fit(m.name, settings, &store.inputs(head.as_ref()))?;
    det.save(req.output)?;
    let mut prov = store.manifest.provenance();
    prov.dim = store.dim();
    provenance::stamp_detector(req.output, &prov)?;
    Ok(Fitted {
        method: m.name,
        rows: store.rows(),
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// What `mood score` is asked for.
pub struct ScoreRequest<'a> {
    pub detector: &'a Path,
    pub features: &'a Path,
    pub output: &'a Path,
    pub device: Device,
    pub allow_mismatch: bool,
}

/// What a scoring run did: the method, the rows scored, where and in how many seconds.
pub struct Scored {
    pub method: String,
    pub rows: usize,
    pub on_gpu: bool,
    pub seconds: f64,
}

/// Scores the store with the detector (provenance compared first) and writes the scores .npy.
pub fn score(req: &ScoreRequest) -> Result<Scored> {
    crate::fsutil::refuse_inside(req.output, "-o", req.features, "the store")?;
    let det = Detector::load(req.detector)?;
    let store = FeatureStore::open(req.features)?;
    provenance::say_notes(&store);
    match provenance::detector_provenance(req.detector)? {
        Some(trained) => {
            let mut prov = store.manifest.provenance();
            prov.dim = store.dim();
            let d = format!("--detector {}", req.detector.display());
            let f = format!("--features {}", req.features.display());
            provenance::compare(&trained, &d, &prov, &f, req.allow_mismatch)?;
        }
        None if !crate::progress::quiet() => eprintln!(
            "note: {} records no train store provenance (an older mood): not compared with {}",
            req.detector.display(),
            req.features.display()
        ),
        None => {}
    }
    let device = ScoreDevice::open(req.device)?;
    device.note_cpu_methods(&[det.method()]);
    let t = Instant::now();
    let scorer = device.prepare(&det)?;
    let scores = scorer.score(&store.inputs(None))?;
    crate::npy::write_f32(req.output, &[scores.len()], &scores)?;
    Ok(Scored {
        method: det.method().to_string(),
        rows: scores.len(),
        on_gpu: scorer.on_gpu(),
        seconds: t.elapsed().as_secs_f64(),
    })
}
