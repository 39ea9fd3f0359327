//! Model configurations, named as timm names them, plus tiny configs for tests.

use crate::backend::Pool;
use crate::error::{Error, Result};

/// How position information enters the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelPos {
    None,
    /// One relative-position bias table per block (`blocks.{i}.attn.relative_position_bias_table`).
    PerBlock,
    /// One table for all blocks (`rel_pos_bias.relative_position_bias_table`), as in BEiT's
    /// self-supervised checkpoints.
    Shared,
}

/// Bias of the fused qkv projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvBias {
    None,
    /// BEiT: `q_bias` and `v_bias`, the k bias is always zero.
    QV,
    /// ViT: one `qkv.bias` of length 3·D.
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    pub name: String,
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    /// Classes of the default head; a checkpoint's own head size takes precedence.
    pub num_classes: usize,
    pub abs_pos_emb: bool,
    pub rel_pos: RelPos,
    /// Per-block layer scale: `gamma_1/gamma_2` (BEiT) or `ls1.gamma/ls2.gamma` (ViT).
    pub layer_scale: bool,
    pub qkv_bias: QkvBias,
    /// Avg (BEiT: fc_norm after mean of patch tokens) or token (ViT: norm, then class token).
    pub pool: Pool,
    pub eps: f32,
    /// Key prefix style: BEiT names layer scale `gamma_1`, ViT `ls1.gamma`.
    pub beit_names: bool,
}

impl VitConfig {
    pub fn grid(&self) -> (usize, usize) {
        (
            self.img_size / self.patch_size,
            self.img_size / self.patch_size,
        )
    }

    /// Tokens per image: patches + class token.
    pub fn tokens(&self) -> usize {
        let (h, w) = self.grid();
        h * w + 1
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// FLOPs of one forward per image (multiply-add = 2), for GFLOP/s and MFU figures.
    pub fn flops_per_image(&self) -> f64 {
        let (n, d, f, l) = (
            self.tokens() as f64,
            self.embed_dim as f64,
            self.mlp_hidden as f64,
            self.depth as f64,
        );
        let g = n - 1.0;
        let patch = 2.0 * g * d * (self.in_chans * self.patch_size * self.patch_size) as f64;
        let per_block = 2.0 * n * d * (3.0 * d + d + 2.0 * f) + 2.0 * 2.0 * n * n * d;
        patch + l * per_block + 2.0 * d * self.num_classes as f64
    }

    /// A named preset; the error lists the known names.
    pub fn preset(name: &str) -> Result<VitConfig> {
        PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "unknown --arch `{name}`; known: {}",
                    PRESETS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(n, _)| *n).collect()
    }
}

struct Size {
    d: usize,
    depth: usize,
    heads: usize,
    img: usize,
    patch: usize,
}

const BASE: Size = Size {
    d: 768,
    depth: 12,
    heads: 12,
    img: 224,
    patch: 16,
};
const LARGE: Size = Size {
    d: 1024,
    depth: 24,
    heads: 16,
    img: 224,
    patch: 16,
};

fn beit(name: &str, s: Size, rel_pos: RelPos) -> VitConfig {
    VitConfig {
        name: name.to_string(),
        img_size: s.img,
        patch_size: s.patch,
        in_chans: 3,
        embed_dim: s.d,
        depth: s.depth,
        num_heads: s.heads,
        mlp_hidden: 4 * s.d,
        num_classes: 1000,
        abs_pos_emb: false,
        rel_pos,
        layer_scale: true,
        qkv_bias: QkvBias::QV,
        pool: Pool::MeanPatches,
        eps: 1e-6,
        beit_names: true,
    }
}

fn vit(name: &str, s: Size) -> VitConfig {
    VitConfig {
        name: name.to_string(),
        img_size: s.img,
        patch_size: s.patch,
        in_chans: 3,
        embed_dim: s.d,
        depth: s.depth,
        num_heads: s.heads,
        mlp_hidden: 4 * s.d,
        num_classes: 1000,
        abs_pos_emb: true,
        rel_pos: RelPos::None,
        layer_scale: false,
        qkv_bias: QkvBias::Full,
        pool: Pool::ClassToken,
        eps: 1e-6,
        beit_names: false,
    }
}

/// The demo's model: 32×32 inputs (the 8×8 digits upsampled), 4×4 patches of 8 pixels.
const DIGITS: Size = Size {
    d: 64,
    depth: 4,
    heads: 4,
    img: 32,
    patch: 8,
};

const TINY: Size = Size {
    d: 48,
    depth: 2,
    heads: 3,
    img: 32,
    patch: 8,
};

fn tiny(mut c: VitConfig) -> VitConfig {
    c.mlp_hidden = 4 * c.embed_dim;
    c.num_classes = 10;
    c
}

type Preset = (&'static str, fn() -> VitConfig);

static PRESETS: &[Preset] = &[
    ("beit_base_patch16_224", || {
        beit("beit_base_patch16_224", BASE, RelPos::PerBlock)
    }),
    ("beit_large_patch16_224", || {
        beit("beit_large_patch16_224", LARGE, RelPos::PerBlock)
    }),
    ("beit_base_patch16_384", || {
        beit(
            "beit_base_patch16_384",
            Size { img: 384, ..BASE },
            RelPos::PerBlock,
        )
    }),
    ("beit_large_patch16_384", || {
        beit(
            "beit_large_patch16_384",
            Size { img: 384, ..LARGE },
            RelPos::PerBlock,
        )
    }),
    ("beit_large_patch16_512", || {
        beit(
            "beit_large_patch16_512",
            Size { img: 512, ..LARGE },
            RelPos::PerBlock,
        )
    }),
    ("beitv2_base_patch16_224", || {
        beit("beitv2_base_patch16_224", BASE, RelPos::PerBlock)
    }),
    ("beitv2_large_patch16_224", || {
        beit("beitv2_large_patch16_224", LARGE, RelPos::PerBlock)
    }),
    // MOODv2's BEiT-L with 14-pixel patches (16×16 grid, 257 tokens).
    ("beit_large_patch14_224", || {
        beit(
            "beit_large_patch14_224",
            Size { patch: 14, ..LARGE },
            RelPos::PerBlock,
        )
    }),
    // The layout of BEiT's self-supervised checkpoints: one relative-position table shared by all blocks.
    ("beit_base_patch16_224_shared_relpos", || {
        beit("beit_base_patch16_224_shared_relpos", BASE, RelPos::Shared)
    }),
    ("beit_large_patch16_224_shared_relpos", || {
        beit(
            "beit_large_patch16_224_shared_relpos",
            LARGE,
            RelPos::Shared,
        )
    }),
    ("vit_base_patch16_224", || vit("vit_base_patch16_224", BASE)),
    ("vit_large_patch16_224", || {
        vit("vit_large_patch16_224", LARGE)
    }),
    ("beit_tiny_patch8_32", || {
        let mut c = beit("beit_tiny_patch8_32", DIGITS, RelPos::PerBlock);
        c.num_classes = 10;
        // 16 tokens of 2×2 digit pixels carry little of their own: an absolute position embedding
        // (BEiT's use_abs_pos_emb) lets the model know where each one is.
        c.abs_pos_emb = true;
        c
    }),
    ("test_tiny_beit", || {
        tiny(beit("test_tiny_beit", TINY, RelPos::PerBlock))
    }),
    ("test_tiny_beit_shared_relpos", || {
        tiny(beit("test_tiny_beit_shared_relpos", TINY, RelPos::Shared))
    }),
    ("test_tiny_vit", || tiny(vit("test_tiny_vit", TINY))),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_flops_match_timm_count() {
        // timm lists 17.58 GMACs for beit_base_patch16_224 / vit_base_patch16_224.
        let f = VitConfig::preset("beit_base_patch16_224")
            .unwrap()
            .flops_per_image();
        assert!((f / 2e9 - 17.58).abs() < 0.05, "{}", f / 2e9);
    }

    #[test]
    fn unknown_arch_lists_known_ones() {
        let e = VitConfig::preset("resnet50").unwrap_err().to_string();
        assert!(e.contains("beit_base_patch16_224") && e.contains("vit_large_patch16_224"));
    }
}
