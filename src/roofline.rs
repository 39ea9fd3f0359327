//! The roofline of a ViT/BEiT forward on a GPU: each op of the forward (as `model::exec::Exec`
//! splits it) with its FLOPs and the bytes it must move, counted from the model config and the
//! batch; the peak tensor throughput and memory bandwidth of known devices; and the time each op
//! needs at best, max(FLOPs / peak, bytes / bandwidth), whose sum over the forward gives a
//! predicted images/s. `mood bench --roofline` prints it without running anything, and
//! `mood bench --device cuda --profile` sets the measured time of each op beside it.
//!
//! What is counted:
//!   - GEMMs: 2·M·N·K FLOPs; bytes: the input, the weight and the output once each at the op's
//!     element type, the f32 bias once;
//!   - attention (fused, FlashAttention style): 4·B·H·N²·Dh FLOPs (Q·Kᵀ and P·V); bytes: qkv read
//!     and the output written once at the precision, the f32 relative-position bias [H, N, N] read
//!     once (the N² scores never go to memory);
//!   - LayerNorm, residual, token assembly, pooling: no tensor-core work; bytes read + written
//!     once. The residual stream is f32 at every precision (autocast's rule), the LayerNorm of a
//!     block reads it and writes the GEMM's operand at the precision; a residual followed by a
//!     LayerNorm is one pass (`residual+layernorm`: the stream read once, written once, the
//!     norm's output written), as the forward runs it (`Exec::residual_layernorm`); the patch
//!     embedding, the final norm and the head run in f32 (src/model/cuda_exec/).
//!
//! These are the bytes an op cannot avoid moving, not what today's kernels move: a separate cast
//! pass, fc1's bias + GELU pass after its GEMM (cuBLASLt's GELU epilogue is the tanh
//! approximation), a re-read of a tile, or scores written to memory all show as a smaller
//! fraction of the roofline. The text and JSON reports are in `report`. f32 ops are held to the CUDA-core FP32 peak (the f32 GEMMs run without TF32).
//! Launch latency and tile quantisation are left out, so the prediction is a bound: at a small
//! batch it is far out of reach.

use crate::backend::Pool;
use crate::error::{Error, Result};
use crate::model::config::{RelPos, VitConfig};

pub use crate::backend::Precision;

mod report;
pub use report::{
    describe, describe_gpu, ops_json, prediction_json, profile, profile_alone, table, Alone,
    Measured,
};

/// Bytes of one element at `p`.
pub fn elem_bytes(p: Precision) -> f64 {
    match p {
        Precision::F32 => 4.0,
        Precision::Bf16 => 2.0,
    }
}

/// "f32" or "bf16".
pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    }
}

/// One device model: dense peaks (no sparsity) and memory bandwidth, from the vendor's datasheet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    /// How `--gpu` and the tables name it.
    pub name: &'static str,
    /// Every one of these (lowercase, without spaces, '-' or '_') is in the device's name.
    needles: &'static [&'static str],
    /// Dense bf16 tensor-core TFLOP/s with f32 accumulation.
    pub bf16_tflops: f64,
    /// FP32 TFLOP/s on the CUDA cores (no TF32).
    pub f32_tflops: f64,
    /// Memory bandwidth, TB/s (10¹² bytes per second).
    pub mem_tbs: f64,
}

impl Gpu {
    /// The peak TFLOP/s of work at `p`.
    pub fn peak_tflops(&self, p: Precision) -> f64 {
        match p {
            Precision::Bf16 => self.bf16_tflops,
            Precision::F32 => self.f32_tflops,
        }
    }
}

/// The known devices, the more specific names first (an "H100 PCIe" also contains "H100").
/// Sources (dense figures: the datasheets quote bf16 "with sparsity", twice the dense rate):
pub static GPUS: &[Gpu] = &[
    // NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): NVL: BF16
    // 1,671 TFLOPS with sparsity, FP32 60 TFLOPS, 3.9 TB/s.
    Gpu {
        name: "H100 NVL",
        needles: &["h100", "nvl"],
        bf16_tflops: 835.0,
        f32_tflops: 60.0,
        mem_tbs: 3.9,
    },
    // Same datasheet, H100 PCIe: BF16 1,513 with sparsity, FP32 51 TFLOPS, 2.0 TB/s.
    Gpu {
        name: "H100 PCIe",
        needles: &["h100", "pcie"],
        bf16_tflops: 756.0,
        f32_tflops: 51.0,
        mem_tbs: 2.0,
    },
    // Same datasheet, H100 SXM: BF16 1,979 with sparsity, FP32 67 TFLOPS, 3.35 TB/s. nvidia-smi
    // names it "NVIDIA H100 80GB HBM3".
    Gpu {
        name: "H100 SXM",
        needles: &["h100"],
        bf16_tflops: 989.0,
        f32_tflops: 67.0,
        mem_tbs: 3.35,
    },
    // NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): H200 NVL: BF16
    // 1,671 with sparsity, FP32 60 TFLOPS, 4.8 TB/s.
    Gpu {
        name: "H200 NVL",
        needles: &["h200", "nvl"],
        bf16_tflops: 835.0,
        f32_tflops: 60.0,
        mem_tbs: 4.8,
    },
    // Same datasheet, H200 SXM: BF16 1,979 with sparsity, FP32 67 TFLOPS, 4.8 TB/s.
    Gpu {
        name: "H200",
        needles: &["h200"],
        bf16_tflops: 989.0,
        f32_tflops: 67.0,
        mem_tbs: 4.8,
    },
    // NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): BF16 312
    // TFLOPS dense, FP32 19.5; 40GB PCIe and SXM 1,555 GB/s, 80GB PCIe 1,935 GB/s, 80GB SXM
    // 2,039 GB/s. nvidia-smi: "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB",
    // "NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB".
    Gpu {
        name: "A100 40GB",
        needles: &["a100", "40gb"],
        bf16_tflops: 312.0,
        f32_tflops: 19.5,
        mem_tbs: 1.555,
    },
    Gpu {
        name: "A100 PCIe 80GB",
        needles: &["a100", "pcie"],
        bf16_tflops: 312.0,
        f32_tflops: 19.5,
        mem_tbs: 1.935,
    },
    Gpu {
        name: "A100 SXM",
        needles: &["a100"],
        bf16_tflops: 312.0,
        f32_tflops: 19.5,
        mem_tbs: 2.039,
    },
    // NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 362.05 TFLOPS dense (733
    // with sparsity), FP32 91.6 TFLOPS, 864 GB/s GDDR6.
    Gpu {
        name: "L40S",
        needles: &["l40s"],
        bf16_tflops: 362.05,
        f32_tflops: 91.6,
        mem_tbs: 0.864,
    },
    // NVIDIA Ada GPU architecture whitepaper, appendix (GeForce RTX 4090): peak BF16 tensor
    // TFLOPS with FP32 accumulate 165.2 dense (330.4 with sparsity; GeForce runs FP32
    // accumulation at half the FP16-accumulate rate), FP32 82.6 TFLOPS, 1,008 GB/s GDDR6X.
    Gpu {
        name: "RTX 4090",
        needles: &["rtx4090"],
        bf16_tflops: 165.2,
        f32_tflops: 82.6,
        mem_tbs: 1.008,
    },
];

fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The device model whose name `name` (a device's name as the driver reports it, e.g. "NVIDIA
/// H100 80GB HBM3", or a `--gpu` value such as "h200", "h100-sxm", "a100") contains.
pub fn match_gpu(name: &str) -> Option<&'static Gpu> {
    let s = squash(name);
    if s.is_empty() {
        return None;
    }
    GPUS.iter().find(|g| squash(g.name) == s).or_else(|| {
        GPUS.iter()
            .find(|g| g.needles.iter().all(|n| s.contains(n)))
    })
}

/// The names of the known devices, for messages.
pub fn known_gpus() -> String {
    GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
}

/// `--gpu NAME`: the device model, or a one-line error listing the known ones.
pub fn gpu(name: &str) -> Result<&'static Gpu> {
    match_gpu(name).ok_or_else(|| {
        Error::Usage(format!(
            "unknown GPU `{name}`: no roofline figures for it; known: {}",
            known_gpus()
        ))
    })
}

/// One op of the forward: what `Exec` calls it (the profile's row), how many times a forward
/// calls it, and per call its FLOPs, the bytes it must move, and the precision its FLOPs run at.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub name: &'static str,
    pub calls: usize,
    pub flops: f64,
    pub bytes: f64,
    pub precision: Precision,
}

impl Op {
    /// Seconds per call at best on `gpu`: max(FLOPs / peak, bytes / bandwidth).
    pub fn roofline_s(&self, gpu: &Gpu) -> f64 {
        let compute = self.flops / (gpu.peak_tflops(self.precision) * 1e12);
        let memory = self.bytes / (gpu.mem_tbs * 1e12);
        compute.max(memory)
    }

    /// "compute" or "memory": which bound the roofline time is.
    pub fn bound(&self, gpu: &Gpu) -> &'static str {
        let compute = self.flops / (gpu.peak_tflops(self.precision) * 1e12);
        if compute >= self.bytes / (gpu.mem_tbs * 1e12) {
            "compute"
        } else {
            "memory"
        }
    }
}

/// The ops of one inference forward of `b` images (`VisionTransformer::forward_with`): the
/// names are those `mood bench --device cuda --profile` gives its measured rows.
pub fn forward_ops(cfg: &VitConfig, b: usize, p: Precision) -> Vec<Op> {
    let f = |x: usize| x as f64;
    let (n, d, hid, c) = (
        f(cfg.tokens()),
        f(cfg.embed_dim),
        f(cfg.mlp_hidden),
        f(cfg.num_classes),
    );
    let (bf, s) = (f(b), elem_bytes(p));
    let g = n - 1.0;
    let bn = bf * n;
    let pix = f(cfg.in_chans * cfg.img_size * cfg.img_size);
    let k_patch = f(cfg.in_chans * cfg.patch_size * cfg.patch_size);
    let f32b = 4.0;
    let gemm = |name, m: f64, k: f64, nn: f64, at: Precision| Op {
        name,
        calls: cfg.depth,
        flops: 2.0 * m * k * nn,
        bytes: elem_bytes(at) * (m * k + nn * k + m * nn) + f32b * nn,
        precision: at,
    };
    let bias_bytes = match cfg.rel_pos {
        RelPos::None => 0.0,
        _ => f32b * f(cfg.num_heads) * n * n,
    };
    let pos_bytes = if cfg.abs_pos_emb { f32b * n * d } else { 0.0 };
    let ls_bytes = if cfg.layer_scale { f32b * d } else { 0.0 };
    let pooled_rows = match cfg.pool {
        Pool::MeanPatches => g,
        Pool::ClassToken => 1.0,
    };
    let mut ops = vec![
        // The staged images copied into the forward's input buffer (read + write, f32).
        Op {
            name: "input",
            calls: 1,
            flops: 0.0,
            bytes: 2.0 * f32b * bf * pix,
            precision: Precision::F32,
        },
        Op {
            name: "patch_embed",
            calls: 1,
            flops: 2.0 * bf * g * k_patch * d,
            bytes: f32b * (bf * pix + d * k_patch + d + bf * g * d),
            precision: Precision::F32,
        },
        Op {
            name: "assemble_tokens",
            calls: 1,
            flops: 0.0,
            bytes: f32b * (bf * g * d + d + bn * d) + pos_bytes,
            precision: Precision::F32,
        },
        // The first block's norm1 alone; every later LayerNorm of a block runs in one pass
        // with the residual before it (`residual+layernorm`).
        Op {
            name: "layernorm",
            calls: cfg.depth.min(1),
            flops: 0.0,
            bytes: f32b * bn * d + s * bn * d + 2.0 * f32b * d,
            precision: p,
        },
        gemm("qkv", bn, d, 3.0 * d, p),
        Op {
            name: "attention",
            calls: cfg.depth,
            flops: 4.0 * bf * n * n * d,
            bytes: s * (bn * 3.0 * d + bn * d) + bias_bytes,
            precision: p,
        },
        gemm("proj", bn, d, d, p),
        // x += γ ⊙ y, then h = LN(x) at the precision: x (f32) and y read, x and h written;
        // γ and the norm's weight and bias read.
        Op {
            name: "residual+layernorm",
            calls: (2 * cfg.depth).saturating_sub(1),
            flops: 0.0,
            bytes: 2.0 * f32b * bn * d + 2.0 * s * bn * d + ls_bytes + 2.0 * f32b * d,
            precision: p,
        },
        // The last block's second residual (the final norm follows pooling): x (f32) and y
        // read, x written; γ read.
        Op {
            name: "residual",
            calls: cfg.depth.min(1),
            flops: 0.0,
            bytes: 2.0 * f32b * bn * d + s * bn * d + ls_bytes,
            precision: p,
        },
        gemm("fc1+gelu", bn, d, hid, p),
        gemm("fc2", bn, hid, d, p),
        Op {
            name: "pool",
            calls: 1,
            flops: 2.0 * bf * pooled_rows * d,
            bytes: f32b * (bf * pooled_rows * d + bf * d),
            precision: Precision::F32,
        },
        Op {
            name: "final_norm",
            calls: 1,
            flops: 0.0,
            bytes: f32b * (2.0 * bf * d + 2.0 * d),
            precision: Precision::F32,
        },
    ];
    if cfg.num_classes > 0 {
        let mut head = gemm("head", bf, d, c, Precision::F32);
        head.calls = 1;
        ops.push(head);
    }
    ops
}

/// The roofline prediction of a forward: its FLOPs and bytes, and the sum over ops of the
/// roofline time.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub gpu: &'static Gpu,
    pub batch: usize,
    pub flops: f64,
    pub bytes: f64,
    /// Σ calls · max(FLOPs / peak, bytes / bandwidth), seconds per forward.
    pub seconds: f64,
}

impl Prediction {
    pub fn img_per_s(&self) -> f64 {
        self.batch as f64 / self.seconds
    }

    /// The TFLOP/s the prediction implies (over the device's peak: the MFU the roofline allows).
    pub fn tflops(&self) -> f64 {
        self.flops / self.seconds / 1e12
    }
}

pub fn predict(ops: &[Op], gpu: &'static Gpu, batch: usize) -> Prediction {
    let sum = |f: &dyn Fn(&Op) -> f64| ops.iter().map(|o| o.calls as f64 * f(o)).sum::<f64>();
    Prediction {
        gpu,
        batch,
        flops: sum(&|o| o.flops),
        bytes: sum(&|o| o.bytes),
        seconds: sum(&|o| o.roofline_s(gpu)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_as_the_driver_reports_them() {
        let name = |s: &str| match_gpu(s).map(|g| g.name);
        assert_eq!(name("NVIDIA H100 80GB HBM3"), Some("H100 SXM"));
        assert_eq!(name("NVIDIA H100 PCIe"), Some("H100 PCIe"));
        assert_eq!(name("NVIDIA H100 NVL"), Some("H100 NVL"));
        assert_eq!(name("NVIDIA H200"), Some("H200"));
        assert_eq!(name("NVIDIA H200 NVL"), Some("H200 NVL"));
        assert_eq!(name("NVIDIA A100-SXM4-80GB"), Some("A100 SXM"));
        assert_eq!(name("NVIDIA A100-SXM4-40GB"), Some("A100 40GB"));
        assert_eq!(name("NVIDIA A100 80GB PCIe"), Some("A100 PCIe 80GB"));
        assert_eq!(name("NVIDIA L40S"), Some("L40S"));
        assert_eq!(name("NVIDIA GeForce RTX 4090"), Some("RTX 4090"));
        assert_eq!(name("h100-sxm"), Some("H100 SXM"));
        assert_eq!(name("h200"), Some("H200"));
        assert_eq!(name("NVIDIA L40"), None);
        assert_eq!(
            name("CPU stand-in, not a GPU (mood-cuda-sim, sm_90 limits)"),
            None
        );
    }

    #[test]
    fn forward_ops_count_the_config_flops() {
        for arch in ["beit_base_patch16_224", "vit_large_patch16_224"] {
            let cfg = VitConfig::preset(arch).unwrap();
            let ops = forward_ops(&cfg, 1, Precision::Bf16);
            let flops: f64 = ops.iter().map(|o| o.calls as f64 * o.flops).sum();
            let pool: f64 = ops
                .iter()
                .filter(|o| o.name == "pool")
                .map(|o| o.flops)
                .sum();
            let want = cfg.flops_per_image();
            assert!(((flops - pool) / want - 1.0).abs() < 1e-12, "{arch}");
        }
    }
}
