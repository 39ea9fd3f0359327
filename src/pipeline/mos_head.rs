//! The run of `mood mos-head`: MOS's group-softmax head fine-tuned on a train store's features,
//! the backbone frozen (train::mos_head), written as a head file stamped with the store's
//! provenance that `mood eval|fit --head FILE` reads.

use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::features::Head;
use crate::store::{write_head, FeatureStore};
use crate::train::mos_head::{fit, GroupLayout, MosHeadConfig};

/// What `mood mos-head` is asked for.
pub struct Request<'a> {
    pub train: &'a Path,
    /// A group layout file (line c: class c's `group index`)...
    pub groups: Option<&'a Path>,
    /// ...or group sizes over the classes in label order, as given (`4,3,3`).
    pub group_sizes: Option<&'a str>,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub output: &'a Path,
}

/// What the run did: the group sizes, the head's width, the SGD steps and rows, the seconds and
/// the last loss.
pub struct Summary {
    pub sizes: Vec<usize>,
    pub width: usize,
    pub steps: usize,
    pub rows: usize,
    pub seconds: f64,
    pub last_loss: f32,
}

/// The groups from `--groups FILE` or `--group-sizes N1,N2,...` (exactly one of them).
pub fn layout(groups: Option<&Path>, group_sizes: Option<&str>) -> Result<GroupLayout> {
    match (groups, group_sizes) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            GroupLayout::parse(&text, &path.display().to_string())
        }
        (None, Some(list)) => {
            let sizes = list
                .split(',')
                .map(|s| s.trim().parse::<usize>().ok().filter(|&n| n > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--group-sizes {list}: expected positive integers separated by commas"
                    ))
                })?;
            Ok(GroupLayout::in_order(&sizes))
        }
        _ => Err(Error::Usage(
            "give the groups: --groups FILE or --group-sizes N1,N2,...".into(),
        )),
    }
}

/// Fits the head on the store's labelled features and writes it (under a temporary name,
/// renamed once stamped).
pub fn run(req: &Request) -> Result<Summary> {
    let layout = layout(req.groups, req.group_sizes)?;
    crate::fsutil::refuse_inside(req.output, "-o", req.train, "the train store")?;
    let store = FeatureStore::open(req.train)?;
    super::eval::refuse_empty(&store, "--train", req.train)?;
    super::provenance::say_notes(&store);
    let labels = store.labels.as_ref().ok_or_else(|| {
        Error::Usage(format!(
            "--train {}: the store has no labels (labels.npy); the head is trained on labelled rows",
            req.train.display()
        ))
    })?;
    let cfg = MosHeadConfig {
        batch: req.batch,
        base_lr: req.lr,
        seed: req.seed,
        ..Default::default()
    };
    let t = Instant::now();
    let dim = store.dim();
    let fitted = fit(store.features.as_slice(), dim, labels, &layout, &cfg)?;
    let head = Head {
        weight: fitted.weight,
        bias: fitted.bias,
        // Stored features are already past fc_norm; it is kept so that `csd` with this head file
        // normalises local tokens as with the store's own head.
        fc_norm: store.head.as_ref().and_then(|h| h.fc_norm.clone()),
    };
    // Written under a temporary name and renamed once stamped, so a crash leaves no head.
    let tmp = crate::fsutil::temp_path(req.output);
    write_head(&tmp, &head)?;
    let mut prov = store.manifest.provenance();
    prov.dim = dim;
    super::provenance::stamp_detector(&tmp, &prov)?;
    std::fs::rename(&tmp, req.output).map_err(|e| Error::io(req.output, e))?;
    Ok(Summary {
        width: layout.width(),
        sizes: layout.sizes,
        steps: fitted.steps,
        rows: labels.len(),
        seconds: t.elapsed().as_secs_f64(),
        last_loss: fitted.last_loss,
    })
}
