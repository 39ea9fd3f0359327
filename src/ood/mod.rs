//! OOD score functions fitted on in-distribution train features, logits or patch tokens. Every
//! score is "higher = more in-distribution". `methods` is the registry (names, needs, settings),
//! `detector` fits, scores, saves and loads them; the other modules are the scores, each a few GEMMs plus row reductions:
//! `gaussian` (Mahalanobis family), `centroid` (distances to centroids, k-means), `knn` (exact
//! kNN and 1-NN cosine), `csd` (MODE), `logits` (MSP, MaxLogit, Energy, Entropy, GradNorm,
//! KL-matching, MOS), `subspace` (ReAct, ViM, Residual) and, through `posthoc`, OpenOOD v1.5's
//! feature-store methods (`ash`, `dice`, `gen`, `fdbd`, `nci`, `nnguide`, `openmax`, `rmds`,
//! `she`, `relation`, `temperature`; docs/methods.md). ODIN needs the model's input gradient, so it is
//! computed at extraction (`extract::odin`) and only read here.
//! `cuda_score` (feature `cuda`) scores the Mahalanobis family and kNN on the GPU.

pub mod ash;
pub mod centroid;
pub mod csd;
#[cfg(feature = "cuda")]
pub mod cuda_score;
pub mod detector;
pub mod dice;
pub mod fdbd;
pub mod gaussian;
pub mod gen;
pub mod knn;
pub mod linalg;
pub mod logistic;
pub mod logits;
pub mod methods;
pub mod multilayer;
pub mod nci;
pub mod nnguide;
pub mod openmax;
pub mod posthoc;
pub mod relation;
pub mod rmds;
pub mod she;
pub mod stats;
pub mod subspace;
pub mod temperature;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The number of rows of a row-major matrix of width `d`, refusing ragged input and non-finite
/// values (the error names the first bad row). `what` names the matrix in the message.
pub fn check_rows(x: &[f32], d: usize, what: &str) -> Result<usize> {
    if d == 0 || x.len() % d != 0 {
        return Err(Error::Data(format!(
            "{what}: {} values do not form rows of {d}",
            x.len()
        )));
    }
    // In parallel: the GPU scorer checks every query row on the host before it uploads them.
    if let Some(i) = x
        .par_chunks(d)
        .position_first(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::Data(format!(
            "{what}: row {i} has a non-finite value"
        )));
    }
    Ok(x.len() / d)
}
