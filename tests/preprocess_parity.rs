//! Preprocessing against torchvision's PIL-backed transforms (fixtures from
//! tools/make_preprocess_fixtures.py): every preset on JPEG (4:2:0 colour, greyscale, CMYK), RGB and
//! RGBA PNG inputs. Two figures per case: from the file through our decoder (the real path), and
//! from PIL's own decoded pixels (the resize, crop and normalisation alone).

mod common;

use std::path::PathBuf;

use common::fixture;
use mood::data::{decode_file, preprocess_batch, Preprocess};

/// The target is 2/255 after normalisation. Reached (printed per case), in 8-bit pixel
/// levels, i.e. max |diff| × std × 255:
/// - From PIL's decoded pixels (the resize, crop and normalisation alone): 0 levels, bit-exact,
///   except one square resize of a non-square image (`flower_rgba/moodv2`), 1 level: Pillow 13
///   sometimes runs the vertical pass before the horizontal one there, by a rule its published
///   source does not show yet; we keep the published order (see src/data/resample.rs).
/// - From the file through our decoder: up to 2 levels, all of it from zune-jpeg's and
///   libjpeg-turbo's IDCT/upsampling rounding (PNG inputs are exact).
fn pil_level_bound(preset: &str) -> f32 {
    match preset {
        "moodv2" | "cifar" => 1.01,
        _ => 0.01,
    }
}
const FILE_LEVEL_BOUND: f32 = 2.01;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    image: String,
    pil_png: String,
    preset: String,
    img_size: usize,
    expected: String,
    shape: Vec<usize>,
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("preprocess/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn presets_match_torchvision() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for c in cases() {
        let pre = Preprocess::preset(&c.preset, c.img_size).unwrap();
        let (shape, expected) = mood::npy::read_f32(&fixture(&c.expected)).unwrap();
        assert_eq!(shape, c.shape, "{}", c.name);
        assert_eq!(shape, vec![3, pre.out_size(), pre.out_size()], "{}", c.name);

        let mut ours = vec![0f32; pre.sample_len()];
        pre.apply_file(&root.join(&c.image), &mut ours).unwrap();
        let d_file = max_diff(&ours, &expected);

        let pil = decode_file(&fixture(&c.pil_png)).unwrap();
        let mut from_pil = vec![0f32; pre.sample_len()];
        pre.apply(&pil, &mut from_pil).unwrap();
        let d_pil = max_diff(&from_pil, &expected);

        // Normalised differences back to 8-bit levels (the smallest std is the worst case).
        let std = pre.std.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let (l_file, l_pil) = (d_file * std * 255.0, d_pil * std * 255.0);
        println!(
            "{:<28} from file {:.5} ({:.2}/255, {l_file:.2} levels)   from PIL pixels {:.5} ({l_pil:.2} levels)",
            c.name,
            d_file,
            d_file * 255.0,
            d_pil,
        );
        if l_file > FILE_LEVEL_BOUND || l_pil > pil_level_bound(&c.preset) {
            failures.push(format!("{} ({l_file:.2} / {l_pil:.2} levels)", c.name));
        }
    }
    assert!(failures.is_empty(), "over the bound: {failures:?}");
}

#[test]
fn batch_matches_single_images_and_reports_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("text.jpg");
    std::fs::write(&bad, "not an image at all").unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let paths = vec![
        root.join("data/china.jpg"),
        bad.clone(),
        fixture("preprocess/flower_grey.jpg"),
    ];
    let pre = Preprocess::preset("mood", 56).unwrap();
    let n = pre.sample_len();
    let mut batch = vec![1f32; 3 * n];
    let results = preprocess_batch(&paths, &pre, 2, &mut batch).unwrap();
    assert!(results[0].is_ok() && results[2].is_ok());
    let msg = results[1].as_ref().unwrap_err().to_string();
    assert!(
        msg.contains("text.jpg") && msg.contains("not a JPEG or PNG"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert!(batch[n..2 * n].iter().all(|&v| v == 0.0));
    for i in [0, 2] {
        let mut one = vec![0f32; n];
        pre.apply_file(&paths[i], &mut one).unwrap();
        assert_eq!(&batch[i * n..(i + 1) * n], &one[..]);
    }
}
