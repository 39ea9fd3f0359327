//! OOD score functions fitted on in-distribution train features. Every score is "higher = more
//! in-distribution". Now: class-conditional Mahalanobis with a tied covariance (MOOD's score) and
//! ODIN through the model; the logit scores (MSP, MaxLogit, Energy, Entropy, GradNorm).

pub mod knn;
pub mod linalg;
pub mod logits;
pub mod mahalanobis;
pub mod odin;
