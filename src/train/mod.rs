//! Training: the autodiff tape over the model's op set and the losses. The optimiser, schedules and
//! the pretraining / fine-tuning loops arrive with the training issue.

pub mod loss;
pub mod tape;
