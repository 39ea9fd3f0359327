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

/// A store of `x` [n, d] with `labels` (if any) and the flat logits x·1ᵀ-ish of a 6-class head (so
/// that `mos` on the store's own logits has the wrong width for the group head's layout).
fn store_of(dir: &std::path::Path, x: &[f32], d: usize, labels: Option<&[usize]>) {
    let n = x.len() / d;
    let flat: Vec<f32> = x.chunks(d).flat_map(|r| r[..6].to_vec()).collect();
    mood::store::write(
        dir,
        mood::store::Contents {
            features: &mood::Tensor::from_vec(&[n, d], x.to_vec()).unwrap(),
            logits: Some(&mood::Tensor::from_vec(&[n, 6], flat).unwrap()),
            labels,
            local: None,
            head: None,
            odin: None,
            manifest: mood::store::Manifest {
                model: "mos-fixture".into(),
                ..Default::default()
            },
        },
    )
    .unwrap();
}

/// The same recipe through the commands: `mood mos-head` writes the head, `mood fit --method mos
/// --method-arg logits=head` + `mood score` take the group logits through it although the stores
/// hold (flat) logits of their own, and the scores are MOS's in PyTorch.
#[test]
fn mos_head_command_then_fit_and_score_give_moss_scores() {
    let (shape, x) = f32s("features");
    let labels: Vec<usize> = mood::npy::read_indices(&fixture("mos_head/labels.npy"))
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let (ts, t) = f32s("test");
    let tmp = tempfile::tempdir().unwrap();
    let (train, test) = (tmp.path().join("train"), tmp.path().join("test"));
    store_of(&train, &x, shape[1], Some(&labels));
    store_of(&test, &t, ts[1], None);
    let p = |q: &std::path::Path| q.to_string_lossy().into_owned();
    let (head, det, scores) = (
        tmp.path().join("mos_head.safetensors"),
        tmp.path().join("mos.safetensors"),
        tmp.path().join("scores.npy"),
    );
    let layout = fixture("mos_head/layout.txt");
    let batch = labels.len().to_string();
    let r = common::run_mood(&[
        "mos-head",
        "--train",
        &p(&train),
        "--groups",
        &p(&layout),
        "--batch",
        &batch,
        "--lr",
        "0.05",
        "-o",
        &p(&head),
    ]);
    assert_eq!(r.0, 0, "mos-head: {}", r.2);
    assert!(
        r.1.contains("mos.logits=head"),
        "says how to score: {}",
        r.1
    );
    let (train_s, head_s, det_s) = (p(&train), p(&head), p(&det));
    let fit = |extra: &[&str]| {
        let mut a = vec![
            "fit",
            "--method",
            "mos",
            "--method-arg",
            "groups=2,3,1",
            "--train",
            &train_s,
            "--head",
            &head_s,
            "-o",
            &det_s,
        ];
        a.extend_from_slice(extra);
        common::run_mood(&a)
    };
    // Without logits=head, the store's own 6 logits are MOS's input: not 2+3+1 groups' 9.
    let r = fit(&[]);
    assert_ne!(r.0, 0, "the store's flat logits were taken as group logits");
    let r = fit(&["--method-arg", "logits=head"]);
    assert_eq!(r.0, 0, "fit: {}", r.2);
    let r = common::run_mood(&[
        "score",
        "--detector",
        &p(&det),
        "--features",
        &p(&test),
        "-o",
        &p(&scores),
    ]);
    assert_eq!(r.0, 0, "score: {}", r.2);
    let (_, got) = mood::npy::read_f32(&scores).unwrap();
    let (_, want) = f32s("mos");
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("mood mos-head + fit + score vs PyTorch's MOS scores: {err:.2e} (absolute)");
    assert_eq!(got.len(), want.len());
    assert!(err <= 1e-5, "{err}");
    // A bad setting is one line.
    let r = fit(&["--method-arg", "logits=flat"]);
    assert_ne!(r.0, 0);
    assert!(
        r.2.trim().lines().count() == 1 && r.2.contains("store or head"),
        "{}",
        r.2
    );
}
