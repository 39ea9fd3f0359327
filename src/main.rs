//! The `mood` binary: argument parsing only. Each subcommand is one function in `mood::cli`.

use clap::{Parser, Subcommand};
use mood::cli;

#[derive(Parser, Debug)]
#[command(
    name = "mood",
    version,
    about = "Out-of-distribution detection with vision transformers"
)]
struct Cli {
    /// Worker threads (0 = one per logical core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// No progress display and no notes, only warnings, errors and results.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// When stderr is not a terminal (a batch job's log): seconds between progress lines.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30.0)]
    progress_every: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The embedded default job: runs on a fresh machine with no downloads.
    Demo(cli::demo::Args),
    /// Version, CPU features, threads, CUDA availability.
    Info(cli::info::Args),
    /// What the commands accept: architectures, OOD methods (needs, settings), presets.
    List(cli::list::Args),
    /// Convert a PyTorch checkpoint to safetensors.
    Convert(cli::convert::Args),
    /// Features and logits of a .npy batch of images.
    Forward(cli::forward::Args),
    /// Masked image modelling on unlabelled in-distribution images.
    Pretrain(cli::pretrain::Args),
    /// Supervised (multi-class or one-class) fine-tuning.
    Finetune(cli::finetune::Args),
    /// MODE's supervised-contrastive (+ ALPA) training of a ResNet encoder, on the CPU.
    ModeTrain(cli::mode_train::Args),
    /// A checkpoint's classifier as weights-only safetensors that timm loads with strict=True.
    Export(cli::export::Args),
    /// Images through a model into a feature store (resumable, shardable).
    Extract(cli::extract::Args),
    /// Join shard stores of `mood extract --shard` in source order.
    Merge(cli::extract::MergeArgs),
    /// Fit an OOD detector on an ID train feature store.
    Fit(cli::fit::FitArgs),
    /// Score a feature store with a fitted detector.
    Score(cli::fit::ScoreArgs),
    /// Fine-tune MOS's group-softmax head on a labelled train store's features.
    MosHead(cli::mos_head::Args),
    /// Fit, score and compare methods: ID train/test stores against OOD stores.
    Eval(cli::eval::Args),
    /// Forward throughput on random weights, beside the sgemm rate of the same machine.
    Bench(cli::bench::Args),
}

/// Keeps freed activation buffers inside the process: glibc otherwise returns every large block
/// to the kernel on free (mmap threshold, heap trimming), so each forward and training step pays
/// page faults and zeroing for memory it just released.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Output piped into a reader that stops early (`mood info | head -3`) ends the process quietly,
/// as it does `cat`: Rust ignores SIGPIPE, so each print to the closed pipe would panic instead.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    tune_allocator();
    quiet_on_closed_pipe();
    if let Err(e) = mood::cuda_stand_in::reexec_if_requested() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let args = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                e.exit();
            }
            // One line, as for every other error; clap's first line names the bad option.
            let msg = e.render().to_string();
            let first = msg.lines().next().unwrap_or("error: bad arguments");
            eprintln!("{first} (see `mood --help`)");
            std::process::exit(2);
        }
    };
    cli::init_threads(args.threads);
    mood::progress::configure(args.quiet, Some(args.progress_every));
    let result = match args.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::Info(a) => cli::info::run(a),
        Command::List(a) => cli::list::run(a),
        Command::Convert(a) => cli::convert::run(a),
        Command::Forward(a) => cli::forward::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Extract(a) => cli::extract::run(a),
        Command::Merge(a) => cli::extract::run_merge(a),
        Command::Fit(a) => cli::fit::run_fit(a),
        Command::Score(a) => cli::fit::run_score(a),
        Command::MosHead(a) => cli::mos_head::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Pretrain(a) => cli::pretrain::run(a),
        Command::Finetune(a) => cli::finetune::run(a),
        Command::ModeTrain(a) => cli::mode_train::run(a),
        Command::Export(a) => cli::export::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
