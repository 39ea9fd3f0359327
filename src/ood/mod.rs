//! OOD score functions fitted on in-distribution train features. Every score is "higher = more
//! in-distribution". Now: class-conditional Mahalanobis with a tied covariance (MOOD's score).

pub mod linalg;
pub mod mahalanobis;
