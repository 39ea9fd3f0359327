//! `mood convert IN.pth -o OUT.safetensors`: a PyTorch checkpoint to safetensors, names normalised.

use std::path::PathBuf;

use crate::error::Result;
use crate::weights::WeightStore;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PyTorch checkpoint (.pth/.pt, zip format) or a safetensors file.
    pub input: PathBuf,
    /// Output .safetensors path.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let store = WeightStore::open(&args.input)?;
    let tensors = store.raw_tensors();
    crate::weights::safetensors::write(&args.output, &tensors, None)?;
    eprintln!(
        "wrote {} tensors to {}",
        tensors.len(),
        args.output.display()
    );
    Ok(())
}
