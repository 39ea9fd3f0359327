//! Vision transformers: configs (named presets), the BEiT/ViT forward, relative positions, init.

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_vit;
pub mod exec;
pub mod gpu_memory;
pub mod init;
pub mod layers;
pub mod relpos;
pub mod vit;

pub use config::VitConfig;
pub use vit::{Output, VisionTransformer};
