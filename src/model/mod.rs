//! The backbones: vision transformers (configs as named presets, the BEiT/ViT forward written once
//! over the `Exec` op set, relative positions, init), timm's ResNets (resnet.rs) and BiT's ResNet-v2
//! (bit.rs).

pub mod backbone;
pub mod bit;
pub mod config;
pub mod conv_exec;
pub mod conv_train_exec;
pub mod cpu_train;
#[cfg(feature = "cuda")]
pub mod cuda_attention;
#[cfg(feature = "cuda")]
pub mod cuda_conv;
#[cfg(feature = "cuda")]
pub mod cuda_conv_memory;
#[cfg(feature = "cuda")]
pub mod cuda_conv_train;
#[cfg(feature = "cuda")]
pub mod cuda_exec;
#[cfg(feature = "cuda")]
pub mod cuda_model;
#[cfg(feature = "cuda")]
pub mod cuda_train;
pub mod exec;
pub mod init;
pub mod layers;
pub mod relpos;
pub mod resnet;
pub mod resnet_train;
pub mod runner;
pub mod train_exec;
pub mod vit;

pub use config::VitConfig;
pub use vit::{Output, VisionTransformer};
