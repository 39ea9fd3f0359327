//! Fitting, scoring, saving and loading every method of the registry (`methods.rs`):
//! `fit` → `Detector` → `score` / `save`; `Detector::load` rebuilds one from its file without the
//! train set.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::ood::centroid::{Centroids, Distance};
use crate::ood::csd::Csd;
use crate::ood::gaussian::{GaussianScore, Reduce};
use crate::ood::knn::Knn;
use crate::ood::logits::{self, KlMatching};
use crate::ood::methods::arg;
use crate::ood::methods::Need::*;
pub use crate::ood::methods::{method, parse_args, Method, Need, METHODS};
use crate::ood::posthoc::{self, Given, Posthoc};
use crate::ood::stats::{Header, Stats};
use crate::ood::subspace::{self, principal_dim, React, Vim};

pub use crate::features::{Head, Inputs, Matrix};

impl<'a> Inputs<'a> {
    /// Which of `needs` are missing (logits count as present when a head can make them).
    pub fn missing(&self, needs: &[Need]) -> Vec<Need> {
        needs
            .iter()
            .copied()
            .filter(|n| match n {
                Features => self.features.is_none(),
                Labels => self.labels.is_none(),
                Logits => self.logits.is_none() && (self.head.is_none() || self.features.is_none()),
                Head => self.head.is_none(),
                Local => self.local.is_none(),
                Odin => self.odin.is_none(),
                Layers => self.layers.is_none(),
            })
            .collect()
    }

    fn features(&self) -> Result<Matrix<'a>> {
        self.features
            .ok_or_else(|| Error::Usage(format!("this method needs {}", Features.what())))
    }
}

enum Kind {
    Gaussian(GaussianScore),
    Centroid(Centroids),
    Knn(Knn),
    Cosine(Knn),
    Csd(Csd),
    /// msp / maxlogit / entropy / energy / gradnorm / mos: no statistics
    Logit,
    /// odin: the store's own per-row scores, no statistics
    Precomputed,
    Kl(KlMatching),
    React(React),
    Vim(Vim),
    Residual(Vim),
    Posthoc(Posthoc),
}

/// What a fitted detector holds, for scorers outside this module (the GPU one).
pub enum Fitted<'a> {
    /// The Mahalanobis family: mahalanobis, mood-v1, gauss, mahalanobis-cc / -avgcc.
    Gaussian(&'a GaussianScore),
    /// knn (not cos / projection, which share the bank but score the k-th dot product).
    Knn(&'a Knn),
    Other,
}

pub struct Detector {
    pub header: Header,
    kind: Kind,
    /// Kept for the methods that score through the head (and logit methods fitted on a head).
    head: Option<Head>,
}

fn need_head(head: Option<&Head>, d: usize) -> Result<&Head> {
    let h = head.ok_or_else(|| Error::Usage(format!("this method needs {}", Head.what())))?;
    if h.bias.is_empty() || h.weight.len() != h.bias.len() * d {
        return Err(Error::Data(format!(
            "head: weight has {} values, which is not {} classes x {d} features",
            h.weight.len(),
            h.bias.len()
        )));
    }
    Ok(h)
}

/// Logits from the store, else computed through the head.
fn logits_of<'a>(
    inputs: &Inputs<'a>,
    head: Option<&Head>,
) -> Result<(std::borrow::Cow<'a, [f32]>, usize)> {
    if let Some(z) = inputs.logits {
        return Ok((std::borrow::Cow::Borrowed(z.data), z.cols));
    }
    head_logits(inputs, head)
}

/// MOS's `logits` setting: `head` takes the logits through the head from the features even where
/// the store holds its own (those are the model's flat head; a group-softmax head trained by
/// `mood mos-head` is another head over the same features).
fn mos_logits<'a>(
    args: &BTreeMap<String, String>,
    inputs: &Inputs<'a>,
    head: Option<&Head>,
) -> Result<(std::borrow::Cow<'a, [f32]>, usize)> {
    match args.get("logits").map(String::as_str).unwrap_or("store") {
        "store" => logits_of(inputs, head),
        "head" => {
            if inputs.features.is_none() || head.or(inputs.head).is_none() {
                return Err(Error::Usage(
                    "mos with logits=head needs the store's features and a head (--head FILE)"
                        .into(),
                ));
            }
            head_logits(inputs, head)
        }
        other => Err(Error::Usage(format!(
            "mos: logits={other}: expected store or head"
        ))),
    }
}

/// Logits computed through the head (`head`, else the inputs') from the features.
fn head_logits<'a>(
    inputs: &Inputs<'a>,
    head: Option<&Head>,
) -> Result<(std::borrow::Cow<'a, [f32]>, usize)> {
    let head = head.or(inputs.head);
    match (inputs.features, head) {
        (Some(f), Some(h)) => {
            let h = need_head(Some(h), f.cols)?;
            crate::ood::check_rows(f.data, f.cols, "features")?;
            Ok((
                std::borrow::Cow::Owned(subspace::logits(f.data, &h.weight, &h.bias, f.cols)),
                h.bias.len(),
            ))
        }
        _ => Err(Error::Usage(format!("this method needs {}", Logits.what()))),
    }
}

fn mos_groups(args: &BTreeMap<String, String>, width: usize) -> Result<Vec<usize>> {
    let spec = args.get("groups").map(String::as_str).unwrap_or("auto");
    let groups: Vec<usize> = if spec == "auto" {
        logits::MOS_IMAGENET_GROUPS.to_vec()
    } else {
        spec.split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::Usage(format!(
                    "--method-arg groups={spec}: expected sizes like 398,521,9"
                ))
            })?
    };
    let total: usize = groups.iter().map(|g| g + 1).sum();
    if total != width {
        return Err(Error::Data(format!(
            "mos: groups {groups:?} need {total} logits (each group plus its 'others'), the logits have {width}; set --method-arg groups=..."
        )));
    }
    Ok(groups)
}

impl Detector {
    /// Fits `method` with settings `args` (from `parse_args`) on ID train data.
    pub fn fit(name: &str, args: BTreeMap<String, String>, inputs: &Inputs) -> Result<Detector> {
        let m = method(name)?;
        let missing = inputs.missing(&Need::select(m.needs, Need::to_fit));
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "method `{name}` needs {}",
                missing
                    .iter()
                    .map(|n| n.what())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
        // Every fit below needs rows; a message of the statistic that fails first on none ("k = 50
        // must be in 1..=0") would not say that the train set is empty.
        let train_rows = inputs
            .features
            .or(inputs.logits)
            .or(inputs.local)
            .map(|m| m.rows());
        if train_rows == Some(0) && name != "odin" {
            return Err(Error::Data(format!(
                "method `{name}`: the train inputs have 0 rows (an empty train store); fit on a store with rows"
            )));
        }
        if name == "msp" || name == "energy" {
            logits::check_temperature(arg(&args, "t")?)?;
        }
        let labels = || {
            inputs
                .labels
                .ok_or_else(|| Error::Usage(format!("this method needs {}", Labels.what())))
        };
        let mut head = None;
        let mut dim = inputs.features.map_or(0, |f| f.cols);
        let kind = match name {
            "mahalanobis" => {
                let f = inputs.features()?;
                Kind::Gaussian(GaussianScore::tied(f.data, labels()?, f.cols)?)
            }
            "mood-v1" | "gauss" => {
                let f = inputs.features()?;
                Kind::Gaussian(GaussianScore::single(f.data, f.cols, name == "gauss")?)
            }
            "mahalanobis-cc" | "mahalanobis-avgcc" => {
                let f = inputs.features()?;
                let reduce = if name == "mahalanobis-cc" {
                    Reduce::Min
                } else {
                    Reduce::Mean
                };
                Kind::Gaussian(GaussianScore::per_class(f.data, labels()?, f.cols, reduce)?)
            }
            "euclidean" | "minkowski" | "chebyshev" | "kmeans" => {
                let f = inputs.features()?;
                let dist = match name {
                    "minkowski" => Distance::L1,
                    "chebyshev" => Distance::LInf,
                    _ => Distance::L2,
                };
                let (k, seed) = if name == "kmeans" {
                    (arg(&args, "k")?, arg(&args, "seed")?)
                } else {
                    (1, 0)
                };
                Kind::Centroid(Centroids::fit(f.data, f.cols, dist, k, seed)?)
            }
            "cos" | "projection" => {
                let f = inputs.features()?;
                Kind::Cosine(Knn::fit(f.data, f.cols, 1)?)
            }
            "knn" => {
                let f = inputs.features()?;
                Kind::Knn(Knn::fit(f.data, f.cols, arg(&args, "k")?)?)
            }
            "csd" => {
                let l = inputs
                    .local
                    .ok_or_else(|| Error::Usage(format!("csd needs {}", Local.what())))?;
                let t = inputs.local_tokens;
                if t == 0 || l.cols % t != 0 {
                    return Err(Error::Data(format!(
                        "local features of width {} are not {t} tokens",
                        l.cols
                    )));
                }
                dim = l.cols / t;
                let norm = inputs.head.and_then(|h| h.fc_norm.clone());
                Kind::Csd(Csd::fit(l.data, t, dim, norm, arg(&args, "k")?)?)
            }
            "msp" | "maxlogit" | "entropy" | "energy" | "gradnorm" | "mos" => {
                let (z, c) = match name {
                    "mos" => mos_logits(&args, inputs, None)?,
                    _ => logits_of(inputs, None)?,
                };
                crate::ood::check_rows(&z, c, "train logits")?;
                if name == "mos" {
                    mos_groups(&args, c)?;
                }
                let through_head = name == "mos" && args.get("logits").is_some_and(|v| v == "head");
                if inputs.logits.is_none() || through_head {
                    head = inputs.head.cloned();
                }
                Kind::Logit
            }
            "kl-matching" => {
                let (z, c) = logits_of(inputs, None)?;
                if inputs.logits.is_none() {
                    head = inputs.head.cloned();
                }
                Kind::Kl(KlMatching::fit(&z, c)?)
            }
            "react" | "vim" | "residual" => {
                let f = inputs.features()?;
                let h = need_head(inputs.head, f.cols)?;
                head = Some(h.clone());
                match name {
                    "react" => Kind::React(React::fit(f.data, f.cols, arg(&args, "percentile")?)?),
                    _ => {
                        let dim_arg = args.get("dim").map(String::as_str).unwrap_or("auto");
                        let k = if dim_arg == "auto" {
                            principal_dim(f.cols, h.bias.len(), name == "residual")
                        } else {
                            arg(&args, "dim")?
                        };
                        let vim = Vim::fit(f.data, &h.weight, &h.bias, f.cols, k)?;
                        if name == "vim" {
                            Kind::Vim(vim)
                        } else {
                            Kind::Residual(vim)
                        }
                    }
                }
            }
            _ if posthoc::NAMES.contains(&name) => {
                let checked = match m.needs.contains(&Head) {
                    true => Some(need_head(inputs.head, inputs.features()?.cols)?.clone()),
                    false => None,
                };
                let z = match m.needs.contains(&Logits) {
                    true => Some(logits_of(inputs, None)?),
                    false => None,
                };
                if z.is_some() && inputs.logits.is_none() {
                    head = inputs.head.cloned();
                }
                if checked.is_some() {
                    head = checked;
                }
                let given = Given {
                    features: inputs
                        .features
                        .filter(|_| m.needs.contains(&Features))
                        .map(|f| f.data),
                    layers: inputs.layers.map(|l| (l.data, l.cols, inputs.layer_blocks)),
                    dim,
                    logits: z.as_ref().map(|(z, c)| (&z[..], *c)),
                    labels: inputs.labels,
                    head: head.as_ref(),
                };
                Kind::Posthoc(Posthoc::fit(name, &args, &given)?)
            }
            // Nothing to fit: the scores came from the model at extraction.
            "odin" => Kind::Precomputed,
            _ => unreachable!("every registered method is handled"),
        };
        Ok(Detector {
            header: Header {
                method: name.to_string(),
                args,
                dim,
                mood_version: env!("CARGO_PKG_VERSION").to_string(),
            },
            kind,
            head,
        })
    }

    pub fn method(&self) -> &str {
        &self.header.method
    }

    /// The features of `inputs`, refused unless they are as wide as the fitted ones.
    pub fn check_features<'a>(&self, inputs: &Inputs<'a>) -> Result<&'a [f32]> {
        let f = inputs.features()?;
        if f.cols != self.header.dim {
            return Err(Error::Data(format!(
                "features are {} wide but the `{}` detector was fitted on {}-wide features",
                f.cols, self.header.method, self.header.dim
            )));
        }
        Ok(f.data)
    }

    /// The fitted statistics of the methods with a GPU scorer (src/ood/cuda_score.rs).
    pub fn fitted(&self) -> Fitted<'_> {
        match &self.kind {
            Kind::Gaussian(g) => Fitted::Gaussian(g),
            Kind::Knn(k) => Fitted::Knn(k),
            _ => Fitted::Other,
        }
    }

    /// Scores (higher = more in-distribution), one per row of the inputs.
    pub fn score(&self, inputs: &Inputs) -> Result<Vec<f32>> {
        let name = self.header.method.as_str();
        let features = || self.check_features(inputs);
        let args = &self.header.args;
        match &self.kind {
            Kind::Gaussian(g) => g.score(features()?),
            Kind::Centroid(c) => c.score(features()?),
            Kind::Knn(k) => k.score(features()?),
            Kind::Cosine(k) => k.cosine(features()?),
            Kind::Csd(c) => {
                let l = inputs
                    .local
                    .ok_or_else(|| Error::Usage(format!("csd needs {}", Local.what())))?;
                if l.cols != c.tokens * c.dim {
                    return Err(Error::Data(format!(
                        "local features are {} wide, the csd detector expects {} tokens x {}",
                        l.cols, c.tokens, c.dim
                    )));
                }
                c.score(l.data)
            }
            Kind::Kl(kl) => kl.score(&logits_of(inputs, self.head.as_ref())?.0),
            Kind::Precomputed => {
                let s = inputs
                    .odin
                    .ok_or_else(|| Error::Usage(format!("odin needs {}", Odin.what())))?;
                crate::ood::check_rows(s, 1, "ODIN scores")?;
                Ok(s.to_vec())
            }
            Kind::React(r) => {
                let h = need_head(self.head.as_ref(), self.header.dim)?;
                r.score(features()?, &h.weight, &h.bias, self.header.dim)
            }
            Kind::Vim(v) => {
                let h = need_head(self.head.as_ref(), self.header.dim)?;
                v.score(features()?, &h.weight, &h.bias)
            }
            Kind::Residual(v) => Ok(v.residual(features()?)?.iter().map(|r| -r).collect()),
            Kind::Posthoc(p) => {
                let needs = method(name)?.needs;
                let z = match needs.contains(&Logits) {
                    true => Some(logits_of(inputs, self.head.as_ref())?),
                    false => None,
                };
                let head = match needs.contains(&Head) {
                    true => Some(need_head(self.head.as_ref(), self.header.dim)?),
                    false => None,
                };
                let given = Given {
                    features: match needs.contains(&Features) {
                        true => Some(features()?),
                        false => None,
                    },
                    layers: inputs.layers.map(|l| (l.data, l.cols, inputs.layer_blocks)),
                    dim: self.header.dim,
                    logits: z.as_ref().map(|(z, c)| (&z[..], *c)),
                    labels: None,
                    head,
                };
                p.score(args, &given)
            }
            Kind::Logit => {
                let (z, c) = match name {
                    "mos" => mos_logits(args, inputs, self.head.as_ref())?,
                    _ => logits_of(inputs, self.head.as_ref())?,
                };
                match name {
                    "msp" => logits::msp(&z, c, arg(args, "t")?),
                    "maxlogit" => logits::maxlogit(&z, c),
                    "entropy" => logits::entropy(&z, c),
                    "energy" => logits::energy(&z, c, arg(args, "t")?),
                    "mos" => logits::mos(&z, &mos_groups(args, c)?),
                    "gradnorm" => {
                        let f = inputs.features()?;
                        logits::gradnorm(&z, c, f.data, f.cols)
                    }
                    _ => unreachable!("logit methods are listed above"),
                }
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut s = Stats::default();
        match &self.kind {
            Kind::Gaussian(g) => g.save(&mut s),
            Kind::Centroid(c) => c.save(&mut s),
            Kind::Knn(k) | Kind::Cosine(k) => k.save(&mut s),
            Kind::Csd(c) => c.save(&mut s),
            Kind::Kl(kl) => kl.save(&mut s),
            Kind::React(r) => s.put("react.clip", &[1], &[r.clip]),
            Kind::Vim(v) | Kind::Residual(v) => v.save(&mut s),
            Kind::Posthoc(p) => p.save(&mut s, self.header.dim),
            Kind::Logit | Kind::Precomputed => {}
        }
        if let Some(h) = &self.head {
            let c = h.bias.len();
            s.put("head.weight", &[c, h.weight.len() / c], &h.weight);
            s.put("head.bias", &[c], &h.bias);
        }
        s.save(path, &self.header)
    }

    /// Rebuilds the detector in `path`; what is wrong with the file's tensors names the file.
    pub fn load(path: &Path) -> Result<Detector> {
        Detector::load_stats(path).map_err(|e| match e {
            Error::Data(m) => Error::format(path, m),
            e => e,
        })
    }

    fn load_stats(path: &Path) -> Result<Detector> {
        let (s, header) = Stats::load(path)?;
        let name = method(&header.method)?.name;
        let args = &header.args;
        // Every width comes from the header; the tensors must agree with it (a bank of another
        // width would silently score the wrong number of rows).
        let dim = header.dim;
        let kind = match name {
            "mahalanobis" => Kind::Gaussian(GaussianScore::load(&s, false, Reduce::Min, dim)?),
            "mood-v1" | "gauss" | "mahalanobis-cc" => {
                Kind::Gaussian(GaussianScore::load(&s, true, Reduce::Min, dim)?)
            }
            "mahalanobis-avgcc" => {
                Kind::Gaussian(GaussianScore::load(&s, true, Reduce::Mean, dim)?)
            }
            "euclidean" | "kmeans" => Kind::Centroid(Centroids::load(&s, Distance::L2, dim)?),
            "minkowski" => Kind::Centroid(Centroids::load(&s, Distance::L1, dim)?),
            "chebyshev" => Kind::Centroid(Centroids::load(&s, Distance::LInf, dim)?),
            "cos" | "projection" => Kind::Cosine(Knn::load(&s, 1, dim)?),
            "knn" => Kind::Knn(Knn::load(&s, arg(args, "k")?, dim)?),
            "csd" => Kind::Csd(Csd::load(&s, arg(args, "k")?, dim)?),
            "kl-matching" => Kind::Kl(KlMatching::load(&s)?),
            "react" => Kind::React(React {
                clip: s.scalar("react.clip")?,
            }),
            "vim" => Kind::Vim(Vim::load(&s, dim)?),
            "residual" => Kind::Residual(Vim::load(&s, dim)?),
            "odin" => Kind::Precomputed,
            _ if posthoc::NAMES.contains(&name) => {
                Kind::Posthoc(Posthoc::load(name, args, &s, dim)?)
            }
            _ => Kind::Logit,
        };
        let head = if s.contains("head.weight") {
            let (c, weight) = s.matrix("head.weight", dim)?;
            let (_, bias) = s.get("head.bias", 1)?;
            if bias.len() != c {
                return Err(Error::Data(format!(
                    "detector head: {c} classes of weights but {} biases",
                    bias.len()
                )));
            }
            Some(Head {
                weight,
                bias,
                fc_norm: None,
            })
        } else {
            None
        };
        Ok(Detector { header, kind, head })
    }
}
