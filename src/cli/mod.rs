//! One module per subcommand; each exposes `Args` (clap) and `run(args) -> Result<()>`.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod bench_data;
pub mod bench_ood;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod extract;
pub mod finetune;
pub mod fit;
pub mod forward;
pub mod info;
pub mod pretrain;
pub mod runner;
pub mod score_device;
pub mod train_common;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::Result;
use crate::model::{VisionTransformer, VitConfig};
use crate::weights::WeightStore;

/// Sizes rayon's global pool (and so gemm's threads); 0 = one per logical core.
pub fn init_threads(threads: usize) {
    let mut b = rayon::ThreadPoolBuilder::new();
    if threads > 0 {
        b = b.num_threads(threads);
    }
    // A second call (tests, library users) keeps the existing pool.
    let _ = b.build_global();
}

/// A progress bar over `len` items of `unit`, hidden when stderr is not a terminal.
pub fn progress(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let tmpl = format!("{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})");
    pb.set_style(
        ProgressStyle::with_template(&tmpl).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Loads `--arch` with `--weights`, warning about checkpoint tensors the model did not use.
pub fn load_model(arch: &str, weights: &std::path::Path) -> Result<VisionTransformer> {
    let cfg = VitConfig::preset(arch)?;
    let store = WeightStore::open(weights)?;
    let model = VisionTransformer::load(&cfg, &store)?;
    let unused = store.unused();
    if !unused.is_empty() {
        eprintln!(
            "warning: {} tensor(s) in {} not used by {arch}: {}{}",
            unused.len(),
            weights.display(),
            unused
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if unused.len() > 4 { ", ..." } else { "" }
        );
    }
    Ok(model)
}
