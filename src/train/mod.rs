//! Training: losses now; the tape, optimiser and loops arrive with the training issue.

pub mod loss;
