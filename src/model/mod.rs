//! Vision transformers: configs (named presets), the BEiT/ViT forward, relative positions, init.

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_exec;
#[cfg(feature = "cuda")]
pub mod cuda_model;
pub mod exec;
pub mod init;
pub mod layers;
pub mod relpos;
pub mod runner;
pub mod vit;

pub use config::VitConfig;
pub use vit::{Output, VisionTransformer};
