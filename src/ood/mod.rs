//! OOD score functions fitted on in-distribution train features. Every score is "higher = more
//! in-distribution". Now: class-conditional Mahalanobis with a tied covariance (MOOD's score) and
//! ODIN through the model; exact kNN; the logit scores (MSP, MaxLogit, Energy, Entropy, GradNorm,
//! KL-matching);
//! ReAct, ViM and Residual over the linear head.

pub mod knn;
pub mod linalg;
pub mod logits;
pub mod mahalanobis;
pub mod odin;
pub mod subspace;

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
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Data(format!(
            "{what}: row {} has a non-finite value",
            i / d
        )));
    }
    Ok(x.len() / d)
}
