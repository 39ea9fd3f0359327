//! MODE's colour augmentation (src/data/color_jitter.rs) against torchvision: every functional op
//! with fixed factors on small RGB images and a one-channel one
//! (tools/make_color_jitter_fixture.py, torchvision's tensor implementation in float32), and the
//! random transform's draws: how often it jitters and turns grey, the factors' ranges and the
//! order of the four ops.

mod common;

use mood::data::color_jitter::{self as cj, ColorAug, Jitter};
use mood::rng::Rng;

use common::SafetensorsFixture as Fixture;

impl Fixture {
    fn open() -> Fixture {
        Fixture::read("color_jitter/color_jitter.safetensors")
    }

    fn factors(&self, op: &str) -> Vec<f64> {
        let st = self.st();
        let t = st.tensor(&format!("{op}.factors")).unwrap();
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

const IMAGES: [&str; 4] = ["rgb0", "rgb1", "rgb2", "grey0"];

/// The largest |ours − torchvision's| of `op` with `factor` over every fixture image.
fn worst(fx: &Fixture, name: &str, op: &dyn Fn(&mut [f32], usize)) -> f32 {
    let mut worst = 0f32;
    for im in IMAGES {
        let (shape, mut x) = fx.get(im);
        op(&mut x, shape[0]);
        let (_, want) = fx.get(&format!("{name}.{im}"));
        assert_eq!(x.len(), want.len());
        for (i, (a, b)) in x.iter().zip(&want).enumerate() {
            assert!(a.is_finite(), "{name}.{im}[{i}] = {a}");
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

#[test]
fn functional_ops_match_torchvision() {
    let fx = Fixture::open();
    type Op = fn(&mut [f32], usize, f64);
    let ops: [(&str, Op, f32); 4] = [
        // The ops repeat torch's f32 operations in its order, so they agree to the bit but for
        // contrast's mean (summed in f64 here, in torch's own order there): an ulp of it.
        ("brightness", |x, _, f| cj::adjust_brightness(x, f), 1e-6),
        ("contrast", cj::adjust_contrast, 1e-6),
        ("saturation", cj::adjust_saturation, 1e-6),
        // The HSV round trip: a pixel whose h·6 fell within an ulp of a sector boundary could
        // land on the other side than torch's; both sides meet there, so it would move by about
        // an ulp of h·6 times v·s, under 1e-6 too.
        ("hue", cj::adjust_hue, 1e-6),
    ];
    for (name, op, tol) in ops {
        for (k, f) in fx.factors(name).into_iter().enumerate() {
            let w = worst(&fx, &format!("{name}.{k}"), &|x, c| op(x, c, f));
            println!("{name} {f}: max |mood - torchvision| = {w:e}");
            assert!(w <= tol, "{name} {f}: {w} over {tol}");
        }
    }
    let w = worst(&fx, "grayscale", &|x, c| cj::rgb_to_grayscale(x, c));
    println!("grayscale: max |mood - torchvision| = {w:e}");
    assert!(w <= 1e-6, "grayscale: {w}");
}

#[test]
fn the_random_transform_draws_as_mode_asks() {
    let aug = ColorAug::MODE;
    let n = 20_000;
    let (mut jittered, mut grey) = (0usize, 0usize);
    let mut first = [0usize; 4];
    for i in 0..n {
        let mut rng = Rng::new(i as u64 * 7919 + 1);
        let (ops, g) = aug.draw(&mut rng);
        if !ops.is_empty() {
            jittered += 1;
            assert_eq!(ops.len(), 4, "all four ops at non-zero strength");
            let mut kinds: Vec<_> = ops.iter().map(|o| o.0 as usize).collect();
            first[kinds[0]] += 1;
            kinds.sort();
            assert_eq!(kinds, [0, 1, 2, 3], "a permutation");
            for (op, f) in ops {
                let (lo, hi) = if op == Jitter::Hue {
                    (-0.1, 0.1)
                } else {
                    (0.6, 1.4)
                };
                assert!((lo..=hi).contains(&f), "{op:?} {f}");
            }
        }
        grey += g as usize;
    }
    let (pj, pg) = (jittered as f64 / n as f64, grey as f64 / n as f64);
    println!("jittered {pj:.4} (p 0.8), grey {pg:.4} (p 0.2), first op counts {first:?}");
    // Binomial standard deviations at n = 20000: 0.0028 each; the bounds are 4 of them.
    assert!((pj - 0.8).abs() < 0.012, "{pj}");
    assert!((pg - 0.2).abs() < 0.012, "{pg}");
    for c in first {
        let p = c as f64 / jittered as f64;
        assert!(
            (p - 0.25).abs() < 0.02,
            "each op leads a quarter of the time: {first:?}"
        );
    }
    // Off draws nothing and leaves an image as it is.
    let mut img = vec![0.3f32, 0.6, 0.9];
    let mut rng = Rng::new(1);
    assert!(!ColorAug::OFF.apply(&mut img, 3, &mut rng));
    assert_eq!(img, [0.3, 0.6, 0.9]);
}
