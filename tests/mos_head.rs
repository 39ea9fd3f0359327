//! MOS's group-softmax head fitted on features (src/train/mos_head.rs) against the same recipe
//! run in PyTorch (tools/make_mos_head_fixtures.py: MOS's finetune.py loop with BiT's learning-rate
//! rule, SGD with momentum, the group-softmax loss, a zero-initialised head, full batch, a group
//! layout file that does not follow the class order): the trained head's weights, and the MOS
//! scores of held-out features by test_mos.py's formula (max over groups of −p(others)).

mod common;

use common::fixture;
use mood::train::mos_head::{fit, GroupLayout, MosHeadConfig};

fn f32s(name: &str) -> (Vec<usize>, Vec<f32>) {
    mood::npy::read_f32(&fixture(&format!("mos_head/{name}.npy"))).unwrap()
}

fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f32::max)
}

#[test]
fn the_head_and_its_mos_scores_match_moss_recipe_in_pytorch() {
    let (shape, x) = f32s("features");
    let labels: Vec<usize> = mood::npy::read_indices(&fixture("mos_head/labels.npy"))
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let text = std::fs::read_to_string(fixture("mos_head/layout.txt")).unwrap();
    let layout = GroupLayout::parse(&text, "layout.txt").unwrap();
    assert_eq!(layout.sizes, vec![2, 3, 1]);
    let cfg = MosHeadConfig {
        batch: labels.len(),
        base_lr: 0.05,
        ..Default::default()
    };
    let head = fit(&x, shape[1], &labels, &layout, &cfg).unwrap();
    assert_eq!(head.steps, 500);
    let (_, w) = f32s("weight");
    let (_, b) = f32s("bias");
    let (ew, eb) = (rel(&head.weight, &w), rel(&head.bias, &b));

    let (ts, t) = f32s("test");
    let width = layout.width();
    let mut z = vec![0.0f32; ts[0] * width];
    for (row, xr) in z.chunks_mut(width).zip(t.chunks(ts[1])) {
        for (j, v) in row.iter_mut().enumerate() {
            let wr = &head.weight[j * ts[1]..(j + 1) * ts[1]];
            *v = head.bias[j] + wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    let got = mood::ood::logits::mos(&z, &layout.sizes).unwrap();
    let (_, want) = f32s("mos");
    let es = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "mos head vs PyTorch after 500 steps: weight {ew:.2e}, bias {eb:.2e} (relative), MOS scores {es:.2e} (absolute)"
    );
    assert!(ew <= 1e-4 && eb <= 1e-4, "weight {ew}, bias {eb}");
    assert!(es <= 1e-5, "{es}");
}
