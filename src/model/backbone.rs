//! Any backbone mood runs, chosen by `--arch`: a vision transformer (BEiT, ViT), a ResNet or a
//! BiT ResNet-v2.
//! Extraction and `mood forward` see only what is common: the input geometry, the feature
//! width, the head, and a `Runner` that gives features, logits and local tokens.

use crate::error::{Error, Result};
use crate::model::bit::{Bit, BitConfig};
use crate::model::resnet::{ResNet, ResNetConfig};
use crate::model::runner::{CpuRunner, Runner};
use crate::model::{Output, VisionTransformer, VitConfig};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

pub enum Backbone {
    Vit(Box<VisionTransformer>),
    ResNet(Box<ResNet>),
    Bit(Box<Bit>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Vit,
    ResNet,
    Bit,
}

/// What the checkpoint's keys say it is, for the message when `--arch` says otherwise.
fn family_of_keys(store: &WeightStore) -> Option<(Family, &'static str)> {
    if store.contains("layer1.0.conv1.weight") {
        Some((Family::ResNet, "a ResNet (keys layer1.0.conv1.weight, ...; use --arch resnet18|resnet34|resnet50|resnet18_cifar|...)"))
    } else if store.contains("stem.conv.weight") && store.contains("stages.0.blocks.0.conv1.weight")
    {
        Some((Family::Bit, "a BiT ResNet-v2 (keys stem.conv.weight, stages.N.blocks.M..., or Google's resnet/block1/unit01/... and big_transfer's body.block1.unit01...; use --arch resnetv2_101x1_bit|resnetv2_50x1_bit)"))
    } else if store.contains("patch_embed.proj.weight") {
        Some((Family::Vit, "a vision transformer (keys patch_embed.proj.weight, blocks.N..., ...; use a beit_*/vit_* --arch)"))
    } else {
        None
    }
}

/// The ViT/BEiT preset `arch`; for an unknown name the one-line error lists the ResNets too.
pub fn vit_preset(arch: &str) -> Result<VitConfig> {
    VitConfig::preset(arch).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!(
            "{m}; ResNets: {}; BiT: {}",
            ResNetConfig::preset_names().join(", "),
            BitConfig::preset_names().join(", ")
        )),
        e => e,
    })
}

impl Backbone {
    /// `arch` (a ViT/BEiT, ResNet or BiT preset) with the weights of `store`. A checkpoint of
    /// another family is named as such rather than reported as a missing tensor.
    pub fn load(arch: &str, store: &WeightStore) -> Result<Backbone> {
        let resnet = ResNetConfig::preset(arch);
        let bit = BitConfig::preset(arch);
        let family = match (&resnet, &bit) {
            (Some(_), _) => Family::ResNet,
            (_, Some(_)) => Family::Bit,
            _ => Family::Vit,
        };
        if let Some((f, what)) = family_of_keys(store) {
            if f != family {
                return Err(Error::format(
                    store.path(),
                    format!("the weights are {what}, not --arch {arch}"),
                ));
            }
        }
        if let Some(cfg) = bit {
            return Ok(Backbone::Bit(Box::new(Bit::load(&cfg, store)?)));
        }
        match resnet {
            Some(cfg) => Ok(Backbone::ResNet(Box::new(ResNet::load(&cfg, store)?))),
            None => {
                let cfg = vit_preset(arch)?;
                Ok(Backbone::Vit(Box::new(VisionTransformer::load(
                    &cfg, store,
                )?)))
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Backbone::Vit(m) => &m.cfg.name,
            Backbone::ResNet(m) => &m.cfg.name,
            Backbone::Bit(m) => &m.cfg.name,
        }
    }

    pub fn img_size(&self) -> usize {
        match self {
            Backbone::Vit(m) => m.cfg.img_size,
            Backbone::ResNet(m) => m.cfg.img_size,
            Backbone::Bit(m) => m.cfg.img_size,
        }
    }

    pub fn in_chans(&self) -> usize {
        match self {
            Backbone::Vit(m) => m.cfg.in_chans,
            Backbone::ResNet(m) => m.cfg.in_chans,
            Backbone::Bit(m) => m.cfg.in_chans,
        }
    }

    /// Width of the pooled feature.
    pub fn feature_dim(&self) -> usize {
        match self {
            Backbone::Vit(m) => m.cfg.embed_dim,
            Backbone::ResNet(m) => m.cfg.feature_dim(),
            Backbone::Bit(m) => m.cfg.feature_dim(),
        }
    }

    /// Classes of the checkpoint's head, if it has one.
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            Backbone::Vit(m) => m.num_classes(),
            Backbone::ResNet(m) => m.fc.as_ref().map(|(w, _)| w.shape()[0]),
            Backbone::Bit(m) => m.fc.as_ref().map(|(w, _)| w.shape()[0]),
        }
    }

    /// Local tokens per image (`--local`): ViT patches, or the positions of a ResNet's last map.
    pub fn local_tokens(&self) -> usize {
        match self {
            Backbone::Vit(m) => m.cfg.grid().0 * m.cfg.grid().1,
            Backbone::ResNet(m) => {
                let (h, w) = m.final_grid(m.cfg.img_size);
                h * w
            }
            Backbone::Bit(m) => {
                let (h, w) = m.final_grid(m.cfg.img_size);
                h * w
            }
        }
    }

    /// The head (and the norm before it) for a feature store's head.safetensors.
    pub fn store_head(&self) -> Option<crate::features::Head> {
        match self {
            Backbone::Vit(m) => m.store_head(),
            Backbone::ResNet(m) => m.store_head(),
            Backbone::Bit(m) => m.store_head(),
        }
    }

    /// The transformer, where a path exists only for it (ODIN's tape, the CUDA executor).
    pub fn as_vit(&self) -> Option<&VisionTransformer> {
        match self {
            Backbone::Vit(m) => Some(m),
            Backbone::ResNet(_) | Backbone::Bit(_) => None,
        }
    }

    /// The backbone on the CPU.
    pub fn cpu_runner(&self) -> Box<dyn Runner + '_> {
        match self {
            Backbone::Vit(m) => Box::new(CpuRunner(m)),
            Backbone::ResNet(m) => Box::new(ResNetRunner(m)),
            Backbone::Bit(m) => Box::new(BitRunner(m)),
        }
    }
}

/// A ResNet on the CPU.
pub struct ResNetRunner<'m>(pub &'m ResNet);

impl Runner for ResNetRunner<'_> {
    fn forward(&mut self, images: &Tensor) -> Result<Output> {
        self.0.forward(images)
    }

    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        self.0.forward_local(images)
    }
}

/// A BiT ResNet-v2 on the CPU.
pub struct BitRunner<'m>(pub &'m Bit);

impl Runner for BitRunner<'_> {
    fn forward(&mut self, images: &Tensor) -> Result<Output> {
        self.0.forward(images)
    }

    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        self.0.forward_local(images)
    }
}
