//! The method registry: every score of SPEC Part 1 by name, what it needs from a feature store,
//! its settings and their defaults. `detector` fits and scores them.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// What a method reads from a feature store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Features,
    Labels,
    /// Logits, or a linear head to compute them from the features.
    Logits,
    Head,
    Local,
    /// ODIN scores computed through the model at extraction time.
    Odin,
    /// Per-block pooled features (`mood extract --layers`).
    Layers,
}

impl Need {
    pub fn what(self) -> &'static str {
        match self {
            Need::Features => "features (features.npy)",
            Need::Labels => "train labels (labels.npy)",
            Need::Logits => "logits (logits.npy, or a head: head.safetensors / --head)",
            Need::Head => "the linear head (head.safetensors or --head)",
            Need::Local => "patch-token features (local.npy; extract with --local)",
            Need::Odin => "ODIN scores (odin.npy; extract with --odin)",
            Need::Layers => "per-block features (layers.npy; extract with --layers, e.g. 4,8,12)",
        }
    }

    /// Whether fitting reads it from the train store (ODIN's scores are only scored, never fitted).
    pub fn to_fit(self) -> bool {
        self != Need::Odin
    }

    /// Whether scoring reads it from a test store (labels are for fitting only).
    pub fn to_score(self) -> bool {
        self != Need::Labels
    }

    /// The needs of `needs` that `keep` selects (`Need::to_fit` or `Need::to_score`).
    pub fn select(needs: &[Need], keep: fn(Need) -> bool) -> Vec<Need> {
        needs.iter().copied().filter(|&n| keep(n)).collect()
    }
}

pub struct Method {
    pub name: &'static str,
    pub needs: &'static [Need],
    /// (setting, default, meaning)
    pub args: &'static [(&'static str, &'static str, &'static str)],
    pub about: &'static str,
}

use Need::*;

pub const METHODS: &[Method] = &[
    Method {
        name: "mahalanobis",
        needs: &[Features, Labels],
        args: &[],
        about: "class-conditional, tied covariance: -min_c Mahalanobis^2 (MOODv2, OpenOOD MDS)",
    },
    Method {
        name: "mood-v1",
        needs: &[Features],
        args: &[],
        about: "L2-normalised features, one Gaussian over all train features (MOOD v1)",
    },
    Method {
        name: "mahalanobis-cc",
        needs: &[Features, Labels],
        args: &[],
        about: "L2-normalised, a covariance per class, -min over classes",
    },
    Method {
        name: "mahalanobis-avgcc",
        needs: &[Features, Labels],
        args: &[],
        about: "L2-normalised, a covariance per class, -mean over classes",
    },
    Method {
        name: "euclidean",
        needs: &[Features],
        args: &[],
        about: "-L2 distance to the mean of the L2-normalised train features",
    },
    Method {
        name: "minkowski",
        needs: &[Features],
        args: &[],
        about: "-L1 distance to the mean of the L2-normalised train features",
    },
    Method {
        name: "chebyshev",
        needs: &[Features],
        args: &[],
        about: "-L-infinity distance to the mean of the L2-normalised train features",
    },
    Method {
        name: "cos",
        needs: &[Features],
        args: &[],
        about: "cosine similarity to the nearest train feature",
    },
    Method {
        name: "projection",
        needs: &[Features],
        args: &[],
        about: "max cos(x, f)·|x|^2 on L2-normalised features (ranks as cos)",
    },
    Method {
        name: "gauss",
        needs: &[Features],
        args: &[],
        about: "Ledoit-Wolf-shrunk Mahalanobis on L2-normalised features",
    },
    Method {
        name: "kmeans",
        needs: &[Features],
        args: &[("k", "1", "clusters"), ("seed", "0", "k-means++ seed")],
        about: "-L2 distance to the nearest k-means centroid (normalised features)",
    },
    Method {
        name: "msp",
        needs: &[Logits],
        args: &[("t", "1", "temperature")],
        about: "max softmax probability",
    },
    Method {
        name: "maxlogit",
        needs: &[Logits],
        args: &[],
        about: "max logit",
    },
    Method {
        name: "entropy",
        needs: &[Logits],
        args: &[],
        about: "negated softmax entropy",
    },
    Method {
        name: "energy",
        needs: &[Logits],
        args: &[("t", "1", "temperature")],
        about: "T·logsumexp(z/T)",
    },
    Method {
        name: "react",
        needs: &[Features, Head],
        args: &[(
            "percentile",
            "0.99",
            "clip quantile of all train activations (OpenOOD: 0.90)",
        )],
        about: "energy of the head on clipped features",
    },
    Method {
        name: "vim",
        needs: &[Features, Head],
        args: &[("dim", "auto", "principal subspace size (auto: ViM's rule)")],
        about: "virtual logit matching",
    },
    Method {
        name: "residual",
        needs: &[Features, Head],
        args: &[("dim", "auto", "principal subspace size (auto: ViM's rule)")],
        about: "-norm of the residual outside the principal subspace",
    },
    Method {
        name: "gradnorm",
        needs: &[Features, Logits],
        args: &[],
        about: "|f|_1 · sum_c |C·p_c - 1| (closed-form GradNorm of the head)",
    },
    Method {
        name: "odin",
        needs: &[Odin],
        args: &[],
        about: "max softmax(z(x')/T), x' = x - eps·sign(grad_x CE(z(x)/T, argmax)); through the model at `mood extract --odin T,EPS` (default 1000,0.0014)",
    },
    Method {
        name: "kl-matching",
        needs: &[Logits],
        args: &[],
        about: "-min_c KL(p || mean softmax of train rows predicted c)",
    },
    Method {
        name: "knn",
        needs: &[Features],
        args: &[("k", "50", "neighbour")],
        about: "-squared distance to the k-th nearest normalised train feature",
    },
    Method {
        name: "csd",
        needs: &[Local],
        args: &[("k", "10", "neighbour")],
        about: "MODE's cross-scale decision over 6 pooled patch-token scales",
    },
    Method {
        name: "mos",
        needs: &[Logits],
        args: &[
            (
                "groups",
                "auto",
                "group sizes without 'others', e.g. 398,521,9 (auto: ImageNet's 8 for 1008 logits)",
            ),
            (
                "logits",
                "store",
                "store: the store's logits (else the head's); head: the head's logits from the features, a group-softmax head from `mood mos-head`",
            ),
        ],
        about: "-min_g p_g(others) over group-softmax logits",
    },
    Method {
        name: "ash-p",
        needs: &[Features, Head],
        args: &[("percentile", "90", "prune all but the top (100 - p)% of entries")],
        about: "ASH-P: energy of the head on the feature with all but its largest entries zeroed",
    },
    Method {
        name: "ash-b",
        needs: &[Features, Head],
        args: &[("percentile", "90", "prune all but the top (100 - p)% of entries")],
        about: "ASH-B: as ASH-P, the kept entries set to the row's sum / their count",
    },
    Method {
        name: "ash-s",
        needs: &[Features, Head],
        args: &[("percentile", "90", "prune all but the top (100 - p)% of entries")],
        about: "ASH-S: as ASH-P, the kept entries scaled by exp(sum / kept sum)",
    },
    Method {
        name: "scale",
        needs: &[Features, Head],
        args: &[("percentile", "85", "the top (100 - p)% of entries set the scale")],
        about: "SCALE: energy of the head on the feature scaled by exp(sum / top-entry sum)",
    },
    Method {
        name: "dice",
        needs: &[Features, Head],
        args: &[("p", "90", "sparsity percentile of the weight contributions")],
        about: "DICE: energy of the head with the weights of low contribution to the train mean zeroed",
    },
    Method {
        name: "gen",
        needs: &[Logits],
        args: &[("gamma", "0.1", "exponent"), ("m", "100", "largest probabilities used")],
        about: "GEN: -sum p^gamma (1-p)^gamma over the M largest softmax probabilities",
    },
    Method {
        name: "fdbd",
        needs: &[Features, Head],
        args: &[(
            "distance_as_normalizer",
            "true",
            "divide by |x - train mean| (true) or |x| (false)",
        )],
        about: "fDBD: mean feature distance to the decision boundaries of the predicted class",
    },
    Method {
        name: "nci",
        needs: &[Features, Head],
        args: &[("alpha", "0.0001", "weight of |x|_1")],
        about: "NCI: cos(W_pred, x - train mean)·|W_pred| + alpha·|x|_1 (neural collapse)",
    },
    Method {
        name: "nnguide",
        needs: &[Features, Logits],
        args: &[
            ("k", "100", "neighbours"),
            ("alpha", "0.01", "fraction of the train rows in the bank"),
        ],
        about: "NNGuide: energy times the mean top-K similarity to an energy-weighted train bank",
    },
    Method {
        name: "openmax",
        needs: &[Logits, Labels],
        args: &[
            ("tailsize", "20", "largest distances per class that fit its Weibull"),
            ("alpha", "3", "top-ranked classes whose logits are revised"),
            ("distance", "euclidean", "to the mean activation vector: euclidean or eucos"),
        ],
        about: "OpenMax: -P(unknown) after Weibull revision of the top logits (libMR's fit)",
    },
    Method {
        name: "rmds",
        needs: &[Features, Labels],
        args: &[],
        about: "relative Mahalanobis: class-conditional distance minus a background Gaussian's",
    },
    Method {
        name: "she",
        needs: &[Features, Labels, Logits],
        args: &[],
        about: "SHE: x · the mean train feature of the predicted class (correctly classified rows)",
    },
    Method {
        name: "relation",
        needs: &[Features, Logits],
        args: &[("pow", "1", "power of each relation edge")],
        about: "Relation: sum of feature-and-softmax relations to every train row above 0.03",
    },
    Method {
        name: "mahalanobis-ensemble",
        needs: &[Layers, Labels],
        args: &[
            (
                "weights",
                "1",
                "per-layer weights, comma-separated (one value: every layer), or lr: fitted by logistic regression, ID held-out train rows vs val_ood",
            ),
            (
                "val_ood",
                "",
                "weights=lr: the store of OOD validation rows (extracted with the same --layers)",
            ),
            (
                "lr_c",
                "cv",
                "weights=lr: the L2 penalty's C, or cv (LogisticRegressionCV's 5-fold choice)",
            ),
        ],
        about: "Lee et al.'s multi-layer Mahalanobis: weighted sum of per-block max_c -MD/2",
    },
    Method {
        name: "gram",
        needs: &[Layers, Labels, Logits],
        args: &[("powers", "1,2,3,4,5", "Gram matrix orders, comma-separated")],
        about: "Gram: deviation of per-block Gram features from the predicted class's train ranges",
    },
    Method {
        name: "temp-scaling",
        needs: &[Logits, Labels],
        args: &[("holdout", "0.2", "fraction of train rows that fit T")],
        about: "MSP at the temperature that minimises held-out train NLL",
    },
    Method {
        name: "t2fnorm",
        needs: &[Features, Head],
        args: &[("tau", "0.1", "feature temperature")],
        about: "T2FNorm's inference: max softmax of the head on x / tau",
    },
];

pub fn method(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        Error::Usage(format!(
            "unknown method `{name}`; known: {}",
            METHODS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The settings of a method, defaults filled in, from `--method-arg key=value` strings.
pub fn parse_args(m: &Method, given: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = m
        .args
        .iter()
        .map(|(k, v, _)| (k.to_string(), v.to_string()))
        .collect();
    for g in given {
        let (k, v) = g
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--method-arg `{g}` is not key=value")))?;
        if !out.contains_key(k) {
            let known: Vec<&str> = m.args.iter().map(|a| a.0).collect();
            return Err(Error::Usage(format!(
                "method `{}` has no setting `{k}`; its settings: {}",
                m.name,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

pub(crate) fn arg<T: std::str::FromStr>(args: &BTreeMap<String, String>, key: &str) -> Result<T> {
    let v = args.get(key).map(String::as_str).unwrap_or("");
    v.parse()
        .map_err(|_| Error::Usage(format!("--method-arg {key}={v}: not a valid value")))
}
