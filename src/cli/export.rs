//! `mood export CKPT -o weights.safetensors`: the classifier of a `mood finetune` checkpoint as a
//! weights-only file that timm's `load_state_dict(strict=True)` takes (see `train::export`), with
//! where it came from in the safetensors metadata (pipeline::export).

use std::path::PathBuf;

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint of `mood finetune` (or any checkpoint mood reads that holds a whole classifier).
    pub checkpoint: PathBuf,
    /// Output .safetensors: the classifier's tensors only, under timm's names.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Model preset; default: the architecture the checkpoint records (a mood checkpoint does).
    #[arg(long)]
    pub arch: Option<String>,
    /// Replace an existing --output file.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    let sum = crate::pipeline::export::run(&crate::pipeline::export::Request {
        checkpoint: &args.checkpoint,
        output: &args.output,
        arch: args.arch.as_deref(),
        overwrite: args.overwrite,
    })?;
    let head = match sum.num_classes {
        Some(c) => format!("a head of {c} classes"),
        None => "no head (timm: num_classes=0)".into(),
    };
    eprintln!(
        "wrote {} tensors of {} ({head}) to {}; left out {} training tensors (optimizer moments and the like)",
        sum.tensors,
        sum.arch,
        args.output.display(),
        sum.dropped
    );
    Ok(())
}
