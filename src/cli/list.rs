//! `mood list archs|methods|presets`: what the other commands accept, with what each needs.

use crate::error::Result;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum What {
    /// Model architectures (`--arch`).
    Archs,
    /// OOD methods (`--method`, `--methods`) with the store inputs they need and their settings.
    Methods,
    /// Preprocessing presets (`--preset`).
    Presets,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to list.
    #[arg(value_enum)]
    pub what: What,
}

pub fn run(args: Args) -> Result<()> {
    use std::io::Write;
    let mut lines = Vec::new();
    match args.what {
        What::Archs => {
            for name in crate::model::VitConfig::preset_names() {
                let c = crate::model::VitConfig::preset(name)?;
                lines.push(format!(
                    "{name}: {}x{} input, patch {}, width {}, depth {}, {} classes",
                    c.img_size, c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_classes
                ));
            }
            for name in crate::model::resnet::ResNetConfig::preset_names() {
                let c = crate::model::resnet::ResNetConfig::preset(name).expect("listed preset");
                lines.push(format!(
                    "{name}: {}x{} input, ResNet {:?} blocks {:?}, feature width {}, {} classes{} (extract/forward/bench, CPU or CUDA)",
                    c.img_size,
                    c.img_size,
                    c.block,
                    c.layers,
                    c.feature_dim(),
                    c.num_classes,
                    if c.cifar_stem { ", CIFAR stem" } else { "" }
                ));
            }
            for name in crate::model::bit::BitConfig::preset_names() {
                let c = crate::model::bit::BitConfig::preset(name).expect("listed preset");
                lines.push(format!(
                    "{name}: {}x{} input, BiT ResNet-v2 (GroupNorm, weight standardisation) blocks {:?}, feature width {}, {} classes (extract/forward/bench, CPU or CUDA)",
                    c.img_size, c.img_size, c.layers, c.feature_dim(), c.num_classes
                ));
            }
        }
        What::Methods => {
            for m in crate::ood::detector::METHODS {
                let needs: Vec<&str> = m.needs.iter().map(|n| n.what()).collect();
                let settings: Vec<String> =
                    m.args.iter().map(|(k, v, _)| format!("{k}={v}")).collect();
                lines.push(format!(
                    "{}: {} [needs {}{}]",
                    m.name,
                    m.about,
                    needs.join(", "),
                    if settings.is_empty() {
                        String::new()
                    } else {
                        format!("; settings {}", settings.join(", "))
                    }
                ));
            }
        }
        What::Presets => {
            for p in ["mood", "moodv2", "imagenet", "cifar"] {
                let at224 = crate::data::Preprocess::preset(p, 224)?;
                lines.push(format!("{p}: at 224 px, {at224:?}"));
            }
        }
    }
    // A reader that stops early (`mood list methods | head`) is not an error.
    let mut out = std::io::stdout().lock();
    for l in lines {
        if writeln!(out, "{l}").is_err() {
            break;
        }
    }
    Ok(())
}
