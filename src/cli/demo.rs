//! `mood demo`: the MOOD experiment in miniature on the bundled digits, end to end with no
//! downloads (the plan is pipeline::demo): MIM pretraining + fine-tuning against fine-tuning from
//! scratch, every OOD method evaluated on both; the tables show whether MIM helps here.

use crate::backend::{Device, Precision};
use crate::error::Result;
use crate::pipeline::demo::{at_this_scale, mahalanobis_auroc, Demo, Options};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Masked-image-modelling epochs of model (a).
    #[arg(long, default_value_t = 30)]
    pub pretrain_epochs: usize,
    /// Fine-tuning epochs of model (a); model (b) fine-tunes for both budgets together.
    #[arg(long, default_value_t = 30)]
    pub finetune_epochs: usize,
    /// Seed of both models' initialisation, shuffling, masks and drop-path.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the feature stores, report.json/csv and plots of both models here (a new or empty
    /// folder, or an earlier demo's); without it they go to a temporary folder removed at the end.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Where both models train and their stores are extracted: cpu, cuda (device 0), or auto
    /// (the GPU where there is one). Fitting and scoring stay on the CPU.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// On CUDA: f32, or bf16 autocast for training and extraction.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

pub fn run(args: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let demo = Demo::prepare(Options {
        pretrain_epochs: args.pretrain_epochs,
        finetune_epochs: args.finetune_epochs,
        seed: args.seed,
        out: args.out,
        device: args.device,
        precision: args.precision,
    })?;
    println!(
        "mood demo: MOOD in miniature on the bundled digits ({}, {} threads)",
        demo.place(),
        rayon::current_num_threads()
    );
    println!(
        "  engine check: tiny BEiT features vs timm, max |diff| = {:.1e}",
        demo.engine_diff
    );
    demo.check_engine()?;
    println!(
        "  ID: digits 0-4 ({} train, {} test); OOD: {}",
        demo.sets.train.len(),
        demo.sets.id_test.len(),
        demo.ood_counts()
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (keep, root) = (demo.keeps_output(), demo.root.display());
    if keep {
        println!("  stores, reports and plots go to {root}");
    } else {
        println!("  stores go to {root} and are removed at the end (--out DIR keeps them)");
    }
    let pb = super::train_common::step_bar(demo.total_steps(), 0, "demo");
    let trained = demo.train(&mut |_, _, _, loss| {
        pb.set_message(format!("loss {loss:.3}"));
        pb.inc(1);
        true
    })?;
    pb.finish_and_clear();
    let results = demo.evaluate(&trained)?;
    let hist = &trained.mim_history;
    println!(
        "  MIM reconstruction loss {:.3} -> {:.3}",
        hist.first().copied().unwrap_or(f32::NAN),
        hist.last().copied().unwrap_or(f32::NAN)
    );
    for r in &results {
        println!(
            "\n### {}: ID test accuracy {:.2}%\n",
            r.title,
            100.0 * r.accuracy
        );
        print!("{}", r.report.markdown());
    }
    println!();
    let (a, b) = (
        mahalanobis_auroc(&results[0].report),
        mahalanobis_auroc(&results[1].report),
    );
    println!(
        "MOOD's detector (mahalanobis), average AUROC: (a) {a:.2} vs (b) {b:.2}. {:.0} s in all{}",
        t0.elapsed().as_secs_f64(),
        if keep {
            format!("; stores, reports and plots in {root}")
        } else {
            String::new()
        }
    );
    println!(
        "{}",
        at_this_scale(a - b, demo.sets.train.len(), demo.cfg.depth)
    );
    Ok(())
}
