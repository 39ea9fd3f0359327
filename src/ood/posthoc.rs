//! The post-hoc methods of OpenOOD v1.5 that work from a feature store (docs/methods.md): fit,
//! score, save and load for `detector`, which hands them what the registry says they need.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::ash::{self, Shaping};
use crate::ood::detector::Head;
use crate::ood::dice::Dice;
use crate::ood::fdbd::Fdbd;
use crate::ood::logits::msp;
use crate::ood::methods::arg;
use crate::ood::multilayer::{self, Gram, MahalanobisEnsemble};
use crate::ood::nci::Nci;
use crate::ood::nnguide::NnGuide;
use crate::ood::openmax::{self, OpenMax, OpenMaxDistance};
use crate::ood::relation::Relation;
use crate::ood::rmds::Rmds;
use crate::ood::she::She;
use crate::ood::stats::Stats;
use crate::ood::subspace::logits;
use crate::ood::temperature::fit_temperature;

/// Every method this module fits.
pub const NAMES: &[&str] = &[
    "ash-p",
    "ash-b",
    "ash-s",
    "scale",
    "dice",
    "gen",
    "fdbd",
    "nci",
    "nnguide",
    "openmax",
    "rmds",
    "she",
    "relation",
    "temp-scaling",
    "t2fnorm",
    "mahalanobis-ensemble",
    "gram",
];

/// What the detector hands over: each present when the method's registry entry needs it.
#[derive(Clone, Copy, Default)]
pub struct Given<'a> {
    pub features: Option<&'a [f32]>,
    /// Per-block features [n, L·D], their width L·D and the L block numbers.
    pub layers: Option<(&'a [f32], usize, &'a [usize])>,
    pub dim: usize,
    pub logits: Option<(&'a [f32], usize)>,
    pub labels: Option<&'a [usize]>,
    pub head: Option<&'a Head>,
}

impl<'a> Given<'a> {
    fn features(&self) -> Result<&'a [f32]> {
        self.features
            .ok_or_else(|| Error::Usage("this method needs features (features.npy)".into()))
    }
    fn layers(&self) -> Result<(&'a [f32], usize, &'a [usize])> {
        self.layers.ok_or_else(|| {
            Error::Usage(
                "this method needs per-block features (layers.npy; extract with --layers)".into(),
            )
        })
    }
    fn logits(&self) -> Result<(&'a [f32], usize)> {
        self.logits
            .ok_or_else(|| Error::Usage("this method needs logits or a head".into()))
    }
    fn labels(&self) -> Result<&'a [usize]> {
        self.labels
            .ok_or_else(|| Error::Usage("this method needs train labels (labels.npy)".into()))
    }
    fn head(&self) -> Result<&'a Head> {
        self.head
            .ok_or_else(|| Error::Usage("this method needs the linear head".into()))
    }
}

pub enum Posthoc {
    Shaped(Shaping),
    Dice(Dice),
    Gen,
    Fdbd(Fdbd),
    Nci(Nci),
    NnGuide(NnGuide),
    OpenMax(OpenMax),
    Rmds(Rmds),
    She(She),
    Relation(Relation),
    TempScaled(f32),
    T2fNorm,
    Ensemble(MahalanobisEnsemble),
    Gram(Gram),
}

fn flag(args: &BTreeMap<String, String>, key: &str) -> Result<bool> {
    match args.get(key).map(String::as_str) {
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        v => Err(Error::Usage(format!(
            "--method-arg {key}={}: expected true or false",
            v.unwrap_or("")
        ))),
    }
}

fn positive(args: &BTreeMap<String, String>, key: &str) -> Result<f64> {
    let v: f64 = arg(args, key)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::Usage(format!(
            "--method-arg {key}={v}: it must be a finite number > 0"
        )));
    }
    Ok(v)
}

fn powers(args: &BTreeMap<String, String>) -> Result<Vec<i32>> {
    multilayer::parse_powers(args.get("powers").map_or("", String::as_str))
}

fn distance(args: &BTreeMap<String, String>) -> Result<OpenMaxDistance> {
    OpenMaxDistance::parse(args.get("distance").map_or("", String::as_str))
}

impl Posthoc {
    pub fn fit(name: &str, args: &BTreeMap<String, String>, g: &Given) -> Result<Posthoc> {
        let d = g.dim;
        Ok(match name {
            "ash-p" | "ash-b" | "ash-s" | "scale" => {
                ash::kept(d, arg(args, "percentile")?)?;
                Posthoc::Shaped(Shaping::of(name).expect("an ASH name"))
            }
            "dice" => Posthoc::Dice(Dice::fit(
                g.features()?,
                d,
                &g.head()?.weight,
                arg(args, "p")?,
            )?),
            "gen" => {
                let (z, c) = g.logits()?;
                crate::ood::gen::gen(&z[..0], c, arg(args, "gamma")?, arg(args, "m")?)?;
                Posthoc::Gen
            }
            "fdbd" => Posthoc::Fdbd(Fdbd::fit(
                g.features()?,
                d,
                &g.head()?.weight,
                flag(args, "distance_as_normalizer")?,
            )?),
            "nci" => {
                arg::<f64>(args, "alpha")?;
                Posthoc::Nci(Nci::fit(g.features()?, d)?)
            }
            "nnguide" => {
                let (z, c) = g.logits()?;
                Posthoc::NnGuide(NnGuide::fit(
                    g.features()?,
                    d,
                    z,
                    c,
                    arg(args, "k")?,
                    arg(args, "alpha")?,
                )?)
            }
            "openmax" => {
                let (z, c) = g.logits()?;
                openmax::check_alpha(arg(args, "alpha")?, c)?;
                Posthoc::OpenMax(OpenMax::fit(
                    z,
                    c,
                    g.labels()?,
                    arg(args, "tailsize")?,
                    distance(args)?,
                )?)
            }
            "rmds" => Posthoc::Rmds(Rmds::fit(g.features()?, g.labels()?, d)?),
            "she" => {
                let (z, c) = g.logits()?;
                Posthoc::She(She::fit(g.features()?, d, g.labels()?, z, c)?)
            }
            "relation" => {
                positive(args, "pow")?;
                let (z, c) = g.logits()?;
                Posthoc::Relation(Relation::fit(g.features()?, d, z, c)?)
            }
            "temp-scaling" => {
                let (z, c) = g.logits()?;
                Posthoc::TempScaled(fit_temperature(z, c, g.labels()?, arg(args, "holdout")?)?)
            }
            "t2fnorm" => {
                positive(args, "tau")?;
                Posthoc::T2fNorm
            }
            "mahalanobis-ensemble" => {
                let (x, cols, blocks) = g.layers()?;
                let spec = arg::<String>(args, "weights")?;
                let c = multilayer::parse_lr_c(&arg::<String>(args, "lr_c")?)?;
                Posthoc::Ensemble(if spec == "lr" {
                    let (ood, ood_blocks) =
                        multilayer::read_val_ood(&arg::<String>(args, "val_ood")?)?;
                    let val = multilayer::LrValidation {
                        ood: &ood,
                        blocks: &ood_blocks,
                        c,
                    };
                    MahalanobisEnsemble::fit_lr(x, cols, blocks, g.labels()?, &val)?.0
                } else {
                    multilayer::parse_weights(&spec, blocks.len())?;
                    MahalanobisEnsemble::fit(x, cols, blocks, g.labels()?)?
                })
            }
            "gram" => {
                let (x, cols, blocks) = g.layers()?;
                let (_, c) = g.logits()?;
                Posthoc::Gram(Gram::fit(x, cols, blocks, g.labels()?, c, &powers(args)?)?)
            }
            _ => unreachable!("NAMES lists every post-hoc method"),
        })
    }

    pub fn score(&self, args: &BTreeMap<String, String>, g: &Given) -> Result<Vec<f32>> {
        let d = g.dim;
        match self {
            Posthoc::Shaped(how) => {
                let h = g.head()?;
                ash::score(
                    g.features()?,
                    d,
                    arg(args, "percentile")?,
                    *how,
                    &h.weight,
                    &h.bias,
                )
            }
            Posthoc::Dice(dice) => dice.score(g.features()?, d, &g.head()?.bias),
            Posthoc::Gen => {
                let (z, c) = g.logits()?;
                crate::ood::gen::gen(z, c, arg(args, "gamma")?, arg(args, "m")?)
            }
            Posthoc::Fdbd(f) => {
                let h = g.head()?;
                f.score(g.features()?, &h.weight, &h.bias)
            }
            Posthoc::Nci(n) => {
                let h = g.head()?;
                n.score(g.features()?, &h.weight, &h.bias, arg(args, "alpha")?)
            }
            Posthoc::NnGuide(nn) => {
                let (z, c) = g.logits()?;
                nn.score(g.features()?, z, c)
            }
            Posthoc::OpenMax(o) => {
                let (z, c) = g.logits()?;
                if c != o.classes {
                    return Err(Error::Data(format!(
                        "openmax: the logits have {c} classes, the detector {}",
                        o.classes
                    )));
                }
                o.score(z, arg(args, "alpha")?)
            }
            Posthoc::Rmds(r) => r.score(g.features()?),
            Posthoc::She(s) => {
                let (z, c) = g.logits()?;
                s.score(g.features()?, z, c)
            }
            Posthoc::Relation(r) => {
                let (z, _) = g.logits()?;
                r.score(g.features()?, z, positive(args, "pow")?)
            }
            Posthoc::TempScaled(t) => {
                let (z, c) = g.logits()?;
                msp(z, c, *t)
            }
            Posthoc::Ensemble(m) => {
                let (x, _, blocks) = g.layers()?;
                m.score(x, blocks, &m.weights(&arg::<String>(args, "weights")?)?)
            }
            Posthoc::Gram(gr) => {
                let (x, _, blocks) = g.layers()?;
                let (z, c) = g.logits()?;
                gr.score(x, blocks, z, c)
            }
            Posthoc::T2fNorm => {
                let h = g.head()?;
                let tau = positive(args, "tau")? as f32;
                let x = g.features()?;
                crate::ood::check_rows(x, d, "features")?;
                let scaled: Vec<f32> = x.par_iter().map(|v| v / tau).collect();
                msp(&logits(&scaled, &h.weight, &h.bias, d), h.bias.len(), 1.0)
            }
        }
    }

    pub fn save(&self, s: &mut Stats, d: usize) {
        match self {
            Posthoc::Dice(x) => x.save(s, d),
            Posthoc::Fdbd(x) => x.save(s),
            Posthoc::Nci(x) => x.save(s),
            Posthoc::NnGuide(x) => x.save(s),
            Posthoc::OpenMax(x) => x.save(s),
            Posthoc::Rmds(x) => x.save(s),
            Posthoc::She(x) => x.save(s),
            Posthoc::Relation(x) => x.save(s),
            Posthoc::TempScaled(t) => s.put("temperature", &[1], &[*t]),
            Posthoc::Ensemble(x) => x.save(s),
            Posthoc::Gram(x) => x.save(s),
            Posthoc::Shaped(_) | Posthoc::Gen | Posthoc::T2fNorm => {}
        }
    }

    pub fn load(
        name: &str,
        args: &BTreeMap<String, String>,
        s: &Stats,
        d: usize,
    ) -> Result<Posthoc> {
        Ok(match name {
            "ash-p" | "ash-b" | "ash-s" | "scale" => {
                Posthoc::Shaped(Shaping::of(name).expect("an ASH name"))
            }
            "dice" => Posthoc::Dice(Dice::load(s, d)?),
            "gen" => Posthoc::Gen,
            "fdbd" => Posthoc::Fdbd(Fdbd::load(s, d)?),
            "nci" => Posthoc::Nci(Nci::load(s, d)?),
            "nnguide" => Posthoc::NnGuide(NnGuide::load(s, arg(args, "k")?, d)?),
            "openmax" => Posthoc::OpenMax(OpenMax::load(s, distance(args)?)?),
            "rmds" => Posthoc::Rmds(Rmds::load(s, d)?),
            "she" => Posthoc::She(She::load(s, d)?),
            "relation" => Posthoc::Relation(Relation::load(s, d)?),
            "temp-scaling" => Posthoc::TempScaled(s.scalar("temperature")?),
            "t2fnorm" => Posthoc::T2fNorm,
            "mahalanobis-ensemble" => Posthoc::Ensemble(MahalanobisEnsemble::load(s)?),
            "gram" => Posthoc::Gram(Gram::load(s, &powers(args)?)?),
            _ => unreachable!("NAMES lists every post-hoc method"),
        })
    }
}
