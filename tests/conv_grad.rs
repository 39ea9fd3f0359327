//! The convolutional ops' backward (src/backend/cpu/conv_grad.rs) against torch autograd in
//! float64 (tools/make_conv_grad_fixtures.py): convolution (stem 7x7/2, 3x3 at stride 1 and 2,
//! 1x1 pointwise and 1x1/2), BatchNorm2d in training mode (output, running statistics and the three
//! gradients), max pooling (with ties: PyTorch's first-maximum rule), ReLU and global average pooling.

mod common;

use mood::backend::cpu::conv::{self, Conv};
use mood::backend::cpu::conv_grad;

use common::SafetensorsFixture as Fixture;

impl Fixture {
    fn open() -> Fixture {
        Fixture::read("conv_grad/conv_grad.safetensors")
    }

    /// NCHW tensor `name` as NHWC, with its (B, C, H, W).
    fn nhwc(&self, name: &str) -> ((usize, usize, usize, usize), Vec<f32>) {
        let (s, v) = self.get(name);
        let dims = (s[0], s[1], s[2], s[3]);
        (dims, conv::nchw_to_nhwc(&v, s[0], s[1], s[2], s[3]))
    }
}

/// Largest |a − b| relative to the reference's largest |b|.
fn rel_err(got: &[f32], want: &[f32], what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

fn check(got: &[f32], want: &[f32], tol: f32, what: &str) {
    let e = rel_err(got, want, what);
    println!("{what:<22} {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

#[test]
fn conv2d_backward_matches_torch() {
    let f = Fixture::open();
    for i in 0..5 {
        let p = |k: &str| format!("conv{i}.{k}");
        let g = f.get(&p("geom")).1;
        let cv = Conv {
            cin: g[0] as usize,
            cout: g[1] as usize,
            k: g[2] as usize,
            stride: g[3] as usize,
            pad: g[4] as usize,
        };
        let ((b, _, h, w), x) = f.nhwc(&p("x"));
        let wt = conv::weight_to_hwc(&f.get(&p("w")).1, cv.cout, cv.cin, cv.k);
        let (_, dy) = f.nhwc(&p("dy"));
        let (dx, dw, db) = conv_grad::conv2d_backward(&x, (b, h, w), &wt, &cv, &dy);
        let what = format!("conv {}x{}/{} p{}", cv.k, cv.k, cv.stride, cv.pad);
        check(&dx, &f.nhwc(&p("dx")).1, 1e-5, &format!("{what} dx"));
        let dw_want = conv::weight_to_hwc(&f.get(&p("dw")).1, cv.cout, cv.cin, cv.k);
        check(&dw, &dw_want, 1e-5, &format!("{what} dw"));
        check(&db, &f.get(&p("db")).1, 1e-5, &format!("{what} db"));
    }
}

#[test]
fn batch_norm_training_matches_torch() {
    let f = Fixture::open();
    let ((_, c, _, _), x) = f.nhwc("bn.x");
    let g = f.get("bn.geom").1;
    let (gamma, beta) = (f.get("bn.gamma").1, f.get("bn.beta").1);
    let (mut rm, mut rv) = (f.get("bn.rm").1, f.get("bn.rv").1);
    let (y, saved) =
        conv_grad::batch_norm_train(&x, c, (&gamma, &beta), (&mut rm, &mut rv), g[0], g[1]);
    check(&y, &f.nhwc("bn.y").1, 1e-5, "batch norm y");
    check(&rm, &f.get("bn.rm_new").1, 1e-6, "running mean");
    check(&rv, &f.get("bn.rv_new").1, 1e-6, "running var");
    let (_, dy) = f.nhwc("bn.dy");
    let (dx, dgamma, dbeta) = conv_grad::batch_norm_backward(&dy, c, &gamma, &saved);
    check(&dx, &f.nhwc("bn.dx").1, 1e-5, "batch norm dx");
    check(&dgamma, &f.get("bn.dgamma").1, 1e-5, "batch norm dgamma");
    check(&dbeta, &f.get("bn.dbeta").1, 1e-5, "batch norm dbeta");
}

#[test]
fn max_pool_backward_matches_torch_ties_included() {
    let f = Fixture::open();
    for i in 0..2 {
        let p = |k: &str| format!("pool{i}.{k}");
        let g = f.get(&p("geom")).1;
        let (k, s, pad) = (g[0] as usize, g[1] as usize, g[2] as usize);
        let ((b, c, h, w), x) = f.nhwc(&p("x"));
        let y = conv::max_pool(&x, (b, h, w, c), k, s, pad);
        check(&y, &f.nhwc(&p("y")).1, 0.0, &format!("max pool {i} y"));
        let dx = conv_grad::max_pool_backward(&x, (b, h, w, c), (k, s, pad), &f.nhwc(&p("dy")).1);
        check(&dx, &f.nhwc(&p("dx")).1, 1e-6, &format!("max pool {i} dx"));
    }
}

#[test]
fn mean_and_relu_backward_match_torch() {
    let f = Fixture::open();
    let ((b, c, h, w), _) = f.nhwc("mean.x");
    let dx = conv_grad::mean_hw_backward(&f.get("mean.dy").1, (b, h, w, c));
    check(&dx, &f.nhwc("mean.dx").1, 1e-6, "mean pool dx");
    // ReLU: the gradient passes where the output is positive (the batch-norm fixture's y has
    // both signs), and is zero elsewhere, ties at 0 included.
    let (_, y) = f.nhwc("bn.y");
    let relu: Vec<f32> = y.iter().map(|v| v.max(0.0)).collect();
    let dy = f.nhwc("bn.dy").1;
    let dx = conv_grad::relu_backward(&relu, &dy);
    let want: Vec<f32> = y
        .iter()
        .zip(&dy)
        .map(|(y, g)| if *y > 0.0 { *g } else { 0.0 })
        .collect();
    assert!(relu.contains(&0.0) && relu.iter().any(|v| *v > 0.0));
    check(&dx, &want, 0.0, "relu dx");
}
