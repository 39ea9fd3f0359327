//! `mood mos-head`: MOS's group-softmax head fine-tuned on a train store's features, the backbone
//! frozen (src/train/mos_head.rs), written as a head file that `mood eval|fit --head FILE` reads;
//! `mos` scores through it with `--method-arg mos.logits=head`.

use std::path::PathBuf;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::features::Head;
use crate::store::{write_head, FeatureStore};
use crate::train::mos_head::{fit, GroupLayout, MosHeadConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ID train feature store with labels (from `mood extract`).
    #[arg(long)]
    pub train: PathBuf,
    /// Group layout file: line c is class c's `group index` (both from 0), as MOS's list files.
    #[arg(long, value_name = "FILE", conflicts_with = "group_sizes")]
    pub groups: Option<PathBuf>,
    /// Or: the classes in label order over groups of these sizes, e.g. 4,3,3.
    #[arg(long, value_name = "N1,N2,...")]
    pub group_sizes: Option<String>,
    /// Images per SGD step (MOS: 512).
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// Base learning rate of BiT's schedule (MOS: 0.003).
    #[arg(long, default_value_t = 0.003)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Head file to write (safetensors: head.weight [Σ(size+1), D], head.bias).
    #[arg(short, long)]
    pub output: PathBuf,
}

fn layout(args: &Args) -> Result<GroupLayout> {
    match (&args.groups, &args.group_sizes) {
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

pub fn run(args: Args) -> Result<()> {
    let layout = layout(&args)?;
    crate::fsutil::refuse_inside(&args.output, "-o", &args.train, "the train store")?;
    let store = FeatureStore::open(&args.train)?;
    crate::pipeline::eval::refuse_empty(&store, "--train", &args.train)?;
    crate::pipeline::provenance::say_notes(&store);
    let labels = store.labels.as_ref().ok_or_else(|| {
        Error::Usage(format!(
            "--train {}: the store has no labels (labels.npy); the head is trained on labelled rows",
            args.train.display()
        ))
    })?;
    let cfg = MosHeadConfig {
        batch: args.batch,
        base_lr: args.lr,
        seed: args.seed,
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
    let tmp = crate::fsutil::temp_path(&args.output);
    write_head(&tmp, &head)?;
    let mut prov = store.manifest.provenance();
    prov.dim = dim;
    crate::pipeline::provenance::stamp_detector(&tmp, &prov)?;
    std::fs::rename(&tmp, &args.output).map_err(|e| Error::io(&args.output, e))?;
    let sizes: Vec<String> = layout.sizes.iter().map(|n| n.to_string()).collect();
    eprintln!(
        "mos head: {} groups, {} logits, {} SGD steps on {} rows in {:.2} s (last loss {:.4}) -> {}",
        layout.sizes.len(),
        layout.width(),
        fitted.steps,
        labels.len(),
        t.elapsed().as_secs_f64(),
        fitted.last_loss,
        args.output.display()
    );
    println!(
        "score with: --methods mos --head {} --method-arg mos.groups={} --method-arg mos.logits=head",
        args.output.display(),
        sizes.join(",")
    );
    Ok(())
}
