//! Training: the autodiff tape over the model's op set, losses, AdamW with BEiT's parameter groups
//! and schedules, and the fine-tuning step. The pretraining objective and the CLI loops arrive with
//! the rest of the training issue.

pub mod alpa;
pub mod checkpoint;
pub mod device;
pub mod export;
pub mod loops;
pub mod loss;
pub mod mim;
pub mod mode;
pub mod mode_device;
pub mod mode_resume;
pub mod mos_head;
pub mod optim;
pub mod step;
pub mod supcon;
pub mod tape;
