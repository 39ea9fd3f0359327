//! `mood demo`: the embedded default job, runnable on a fresh machine with no downloads.
//!
//! Today: a tiny BEiT (random weights, made with timm by tools/make_fixtures.py) run on its bundled
//! input, checked against timm's own output. It grows into the digits OOD experiment (extract → fit →
//! eval) as the data pipeline and training land.

use crate::error::{Error, Result};
use crate::model::{VisionTransformer, VitConfig};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

#[derive(clap::Args, Debug)]
pub struct Args {}

static WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit.safetensors");
static INPUT: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit_input.npy");
static TIMM_FEATURES: &[u8] = include_bytes!("../../tests/fixtures/timm/tiny_beit_features.npy");

fn npy(name: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let f = npyz::NpyFile::new(bytes).map_err(|e| Error::format(name, e.to_string()))?;
    let shape = f.shape().iter().map(|&s| s as usize).collect();
    let data = f
        .into_vec::<f32>()
        .map_err(|e| Error::format(name, e.to_string()))?;
    Ok((shape, data))
}

pub fn run(_args: Args) -> Result<()> {
    let cfg = VitConfig::preset("test_tiny_beit")?;
    let store = WeightStore::from_safetensors_bytes("<embedded tiny_beit>", WEIGHTS)?;
    let model = VisionTransformer::load(&cfg, &store)?;
    let (shape, x) = npy("<embedded input>", INPUT)?;
    let (_, want) = npy("<embedded timm features>", TIMM_FEATURES)?;
    let t = std::time::Instant::now();
    let out = model.forward(&Tensor::from_vec(&shape, x)?)?;
    let dt = t.elapsed();
    let max_diff = out
        .features
        .as_slice()
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "mood demo: {} on {} embedded images ({:.1} ms)",
        cfg.name,
        shape[0],
        dt.as_secs_f64() * 1e3
    );
    println!(
        "  features {:?}, max |ours - timm| = {max_diff:.2e}",
        out.features.shape()
    );
    if let Some(l) = &out.logits {
        let c = l.shape()[1];
        let preds: Vec<usize> = l
            .as_slice()
            .chunks(c)
            .map(|r| (0..c).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap_or(0))
            .collect();
        println!("  predicted classes {preds:?}");
    }
    println!("  (the digits OOD experiment joins this demo with the data pipeline and training)");
    if max_diff > 1e-4 {
        return Err(Error::Data(format!(
            "demo output differs from timm by {max_diff:.2e} (> 1e-4)"
        )));
    }
    Ok(())
}
