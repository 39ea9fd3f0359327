//! Data sets and image preprocessing: the bundled digits and photographs used by the demo and
//! the training tests, image folders, CIFAR-10/100, torchvision-compatible preprocessing and the
//! colour augmentation of MODE's training views.

pub mod cifar;
pub mod color_jitter;
pub mod digits;
pub mod image_folder;
pub mod preprocess;
pub mod resample;
pub mod spec;

pub use image_folder::{decode_bytes, decode_file, ImageFolder, RgbImage};
pub use preprocess::{preprocess_batch, Interp, Preprocess, Resize};
