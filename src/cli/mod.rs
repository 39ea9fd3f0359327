//! One module per subcommand; each exposes `Args` (clap) and `run(args) -> Result<()>`, which
//! turns the arguments into calls of crate::pipeline and prints the outcome.

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
pub mod mode_train;
pub mod mos_head;
pub mod pretrain;
pub mod train_common;

// bench_ood.rs names the scoring device from here.
pub use crate::pipeline::load_model;
pub use crate::pipeline::score_device;

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
