//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// tests/fixtures/<rel>. The repository root is the build's, unless `MOOD_REPO_ROOT` names another:
/// test binaries built here and run on another machine (tools/gpu_session.sh) find their fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("MOOD_REPO_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures")
        .join(rel)
}

/// Max |a - b|, failing with the first offending index when it exceeds `tol`.
pub fn assert_max_abs(ours: &[f32], reference: &[f32], tol: f32, what: &str) -> f32 {
    assert_eq!(ours.len(), reference.len(), "{what}: length differs");
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let d = (a - b).abs();
        assert!(
            d.is_finite(),
            "{what}: non-finite at {i}: ours {a}, reference {b}"
        );
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= tol,
        "{what}: max |diff| {} > {tol} at index {i} (ours {}, reference {})",
        worst.0,
        ours[i],
        reference[i]
    );
    worst.0
}
