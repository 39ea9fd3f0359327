//! `mood mos-head`: MOS's group-softmax head fine-tuned on a train store's features, the backbone
//! frozen (src/train/mos_head.rs), written as a head file that `mood eval|fit --head FILE` reads;
//! `mos` scores through it with `--method-arg mos.logits=head`. The run is pipeline::mos_head.

use std::path::PathBuf;

use crate::error::Result;

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

pub fn run(args: Args) -> Result<()> {
    let sum = crate::pipeline::mos_head::run(&crate::pipeline::mos_head::Request {
        train: &args.train,
        groups: args.groups.as_deref(),
        group_sizes: args.group_sizes.as_deref(),
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        output: &args.output,
    })?;
    let sizes: Vec<String> = sum.sizes.iter().map(|n| n.to_string()).collect();
    eprintln!(
        "mos head: {} groups, {} logits, {} SGD steps on {} rows in {:.2} s (last loss {:.4}) -> {}",
        sum.sizes.len(),
        sum.width,
        sum.steps,
        sum.rows,
        sum.seconds,
        sum.last_loss,
        args.output.display()
    );
    println!(
        "score with: --methods mos --head {} --method-arg mos.groups={} --method-arg mos.logits=head",
        args.output.display(),
        sizes.join(",")
    );
    Ok(())
}
