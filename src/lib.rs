//! mood: out-of-distribution detection with vision transformers.
//!
//! The crate is a library (used by the `mood` binary, the tests and the benches) organised by concern:
//! `backend` (the op set, CPU now, CUDA next), `model` (BEiT/ViT written once over the ops),
//! `weights` (safetensors via mmap, restricted .pth reader, key maps), `npy`, and `cli` (one module
//! per subcommand). See ARCHITECTURE.md for how the pieces grow.

pub mod backend;
pub mod cli;
pub mod cuda_stand_in;
pub mod data;
pub mod error;
pub mod extract;
pub mod features;
pub mod fsutil;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod ood;
pub mod param_groups;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod report;
pub mod rng;
pub mod roofline;
pub mod store;
pub mod tensor;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use tensor::Tensor;
