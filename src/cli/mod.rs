//! One module per subcommand; each exposes `Args` (clap) and `run(args) -> Result<()>`.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod bench_data;
pub mod bench_ood;
#[cfg(feature = "cuda")]
pub mod bench_train;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod export;
pub mod extract;
pub mod finetune;
pub mod fit;
pub mod forward;
pub mod info;
pub mod list;
pub mod mos_head;
pub mod pretrain;
pub mod provenance;
pub mod runner;
pub mod score_device;
pub mod sweep;
pub mod train_common;

use crate::error::Result;
use crate::model::backbone::Backbone;
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

/// Progress over `len` items of `unit`: a bar on a terminal, periodic lines in a log (see
/// `crate::progress`).
pub fn progress(len: u64, unit: &str) -> crate::progress::Progress {
    crate::progress::Progress::new(len, unit, "progress")
}

/// Loads `--arch` with `--weights`, warning about checkpoint tensors the model did not use.
pub fn load_model(arch: &str, weights: &std::path::Path) -> Result<Backbone> {
    let store = WeightStore::open(weights)?;
    let model = Backbone::load(arch, &store)?;
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
