//! `mood bench --data DIR`: decode + preprocess throughput of an image folder, the loader half of
//! `mood extract` without the model. tools/bench_decode.py runs it beside PIL + torchvision on the
//! same files and thread counts and prints the ratio.

use std::time::Instant;

use crate::data::image_folder::ImageFolder;
use crate::data::preprocess::{preprocess_batch, Preprocess};
use crate::error::{Error, Result};

/// Images per call of the batch preprocessor: enough to keep every thread busy, small enough that
/// the f32 output stays in a few tens of MB at 224².
const CHUNK: usize = 64;

pub fn run(
    dir: &std::path::Path,
    preset: &str,
    img_size: usize,
    rounds: usize,
    json: bool,
) -> Result<()> {
    if rounds == 0 {
        return Err(Error::Usage("--iters must be at least 1".into()));
    }
    let folder = ImageFolder::open(dir)?;
    let paths = folder.paths();
    if paths.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no images to time",
            dir.display()
        )));
    }
    let pre = Preprocess::preset(preset, img_size)?;
    let mut buf = vec![0f32; CHUNK * pre.sample_len()];
    // Over every pass, the warm-up included: a log sees the whole run move.
    let pb = crate::progress::Progress::new(((rounds + 1) * paths.len()) as u64, "images", "bench");
    let mut once = || -> Result<(f64, usize)> {
        let t = Instant::now();
        let mut failed = 0;
        for chunk in paths.chunks(CHUNK) {
            let out = &mut buf[..chunk.len() * pre.sample_len()];
            failed += preprocess_batch(chunk, &pre, 0, out)?
                .iter()
                .filter(|r| r.is_err())
                .count();
            pb.inc(chunk.len() as u64);
        }
        Ok((t.elapsed().as_secs_f64(), failed))
    };
    // The first pass also warms the page cache, as a reader of the same files twice would.
    let (_, failed) = once()?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        times.push(once()?.0);
    }
    pb.finish_and_clear();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let threads = rayon::current_num_threads();
    let img_s = paths.len() as f64 / median;
    if json {
        println!(
            "{{\"images\": {}, \"failed\": {failed}, \"threads\": {threads}, \"preset\": \"{preset}\", \"img_size\": {img_size}, \"seconds\": {median:.6}, \"images_per_s\": {img_s:.3}}}",
            paths.len()
        );
    } else {
        println!(
            "decode + preprocess ({preset}, {img_size}²): {} images, {threads} threads: {img_s:.1} images/s ({:.1} per thread), median of {rounds}{}",
            paths.len(),
            img_s / threads as f64,
            if failed > 0 { format!(", {failed} unreadable") } else { String::new() }
        );
    }
    Ok(())
}
