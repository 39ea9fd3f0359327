//! `mood eval`: fit each method once on the ID train store, score the ID test store and every OOD
//! store, and report AUROC / AUPR / FPR@95 / detection error per OOD set and on average: a
//! Markdown table on stdout, report.json, report.csv and one PNG per method.

use std::path::PathBuf;

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::metrics;
use crate::ood::detector::{method, METHODS};
use crate::pipeline::eval::{
    check_method_args, check_provenance, evaluate, load_head, prepare_output, refuse_empty, Plan,
};
use crate::pipeline::score_device::ScoreDevice;
use crate::store::FeatureStore;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ID train feature store (fits the detectors).
    #[arg(long)]
    pub train: PathBuf,
    /// ID test feature store.
    #[arg(long)]
    pub id: PathBuf,
    /// An OOD test store as NAME=DIR (repeatable).
    #[arg(long, value_name = "NAME=DIR", required = true)]
    pub ood: Vec<String>,
    /// `all` (every method the stores have the inputs for) or a comma-separated list.
    #[arg(long, default_value = "all")]
    pub methods: String,
    /// A method setting, METHOD.KEY=VALUE, or KEY=VALUE for every method that has KEY.
    #[arg(long = "method-arg", value_name = "[METHOD.]KEY=VALUE")]
    pub method_args: Vec<String>,
    /// With listed values (`--method-arg knn.k=1,10,50`): keep, per method, the value with the
    /// best AUROC on this OOD set (one of the --ood NAMEs), which is then left out of the table.
    #[arg(long, value_name = "NAME")]
    pub tune_on: Option<String>,
    /// Linear head (head.weight, head.bias) for stores without head.safetensors.
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// FPR@95 rule: moodv2 (default: ⌊0.95·n⌋-th ID score, ties accepted), moodv1, mos, openood
    /// (OOD positive), knn (SPEC G).
    #[arg(long, default_value = "moodv2")]
    pub fpr: String,
    /// AUPR estimator: step (average precision, default) or trapezoid (MOODv2, OpenOOD).
    #[arg(long, default_value = "step", value_parser = ["step", "trapezoid"])]
    pub aupr: String,
    /// Directory for report.json, report.csv and plots/ (nothing is written without it).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Where to score: cpu, cuda (mahalanobis, mood-v1, gauss, mahalanobis-cc and knn on the
    /// GPU, in f32; the other methods and every fit on the CPU), or auto (cuda if a device is
    /// usable, else cpu with a note).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Evaluate even when the stores come from different models, weights or preprocessing
    /// (refused otherwise); the report records each mismatch.
    #[arg(long)]
    pub allow_mismatch: bool,
    /// Write into a non-empty -o folder that holds no earlier `mood eval` report, replacing
    /// mood's report files there (other files are left as they are).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: Args) -> Result<()> {
    check_method_args(&args.method_args)?;
    let oods: Vec<(String, PathBuf)> = args
        .ood
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(n, d)| (n.to_string(), PathBuf::from(d)))
                .ok_or_else(|| Error::Usage(format!("--ood `{s}` is not NAME=DIR")))
        })
        .collect::<Result<_>>()?;
    if let Some(on) = &args.tune_on {
        if !oods.iter().any(|(n, _)| n == on) {
            return Err(Error::Usage(format!(
                "--tune-on {on}: no --ood set is named {on}; name one of them (NAME=DIR)"
            )));
        }
        if oods.len() < 2 {
            return Err(Error::Usage(format!(
                "--tune-on {on} leaves no OOD set to report; add another --ood"
            )));
        }
    }
    let names: Vec<&'static str> = if args.methods == "all" {
        METHODS.iter().map(|m| m.name).collect()
    } else {
        args.methods
            .split(',')
            .map(|n| method(n.trim()).map(|m| m.name))
            .collect::<Result<_>>()?
    };
    let rules = metrics::Rules {
        fpr: metrics::FprRule::parse(&args.fpr)?,
        aupr_trapezoid: args.aupr == "trapezoid",
    };
    if let Some(dir) = &args.output {
        for (flag, store) in [("--train", &args.train), ("--id", &args.id)]
            .into_iter()
            .chain(oods.iter().map(|(_, d)| ("--ood", d)))
        {
            crate::fsutil::refuse_inside(dir, "-o", store, &format!("the {flag} store"))?;
        }
    }
    let head = load_head(args.head.as_deref())?;
    let train = FeatureStore::open(&args.train)?;
    let id = FeatureStore::open(&args.id)?;
    let ood_stores: Vec<FeatureStore> = oods
        .iter()
        .map(|(_, d)| FeatureStore::open(d))
        .collect::<Result<_>>()?;
    refuse_empty(&train, "--train", &args.train)?;
    refuse_empty(&id, "--id", &args.id)?;
    for ((n, d), s) in oods.iter().zip(&ood_stores) {
        refuse_empty(s, &format!("--ood {n}="), d)?;
    }
    let tests = std::iter::once((format!("--id {}", args.id.display()), &id)).chain(
        oods.iter()
            .zip(&ood_stores)
            .map(|((n, d), s)| (format!("--ood {n}={}", d.display()), s)),
    );
    let allowed = check_provenance(
        &train,
        &format!("--train {}", args.train.display()),
        tests,
        args.allow_mismatch,
    )?;
    if let Some(dir) = &args.output {
        prepare_output(dir, args.overwrite)?;
    }
    let device = ScoreDevice::open(args.device)?;
    device.note_cpu_methods(&names);
    let plan = Plan {
        device: &device,
        names: &names,
        method_args: &args.method_args,
        head: head.as_ref(),
        rules,
        skip_missing: args.methods == "all",
        plots: args.output.as_deref(),
    };
    let mut report = evaluate(&plan, &train, &id, &oods, &ood_stores)?;
    report.provenance.mismatches_allowed = allowed;
    report.provenance.scored_on = device.describe();
    let tuned = match &args.tune_on {
        Some(on) => crate::pipeline::sweep::tune(&mut report, on),
        None => Vec::new(),
    };
    print!("{}", report.markdown());
    for line in &tuned {
        println!("{line}");
    }
    if let Some(dir) = &args.output {
        report.write(dir)?;
        eprintln!(
            "wrote {}/report.md, report.json, report.csv and plots/",
            dir.display()
        );
    }
    Ok(())
}
