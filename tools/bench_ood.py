#!/usr/bin/env python3
"""OOD scoring at benchmark scale: `mood fit` + `mood score` against numpy / scikit-learn references
on the same data, threads and machine, printed as ratios (issue: OOD library performance).

    python3 tools/bench_ood.py [--threads 2] [--quick]

Cases (random but structured float32 data, seeded):
  mahalanobis  1000 classes, d = 1024, 50 train rows per class (50,000), 50,000 test rows
  knn          k = 50, 100,000 train rows, d = 768, 10,000 queries

References, each timed in this process with numpy/BLAS limited to --threads:
  mahalanobis/loop  the seed repositories' formulation (OpenOOD MDS, MOODv2): a loop over classes,
                    ((x - mu_c) @ P * (x - mu_c)).sum(1); timed on --loop-classes classes and scaled
                    linearly to 1000 (printed as an extrapolation)
  mahalanobis/gemm  numpy with mood's algebra (whiten once, one GEMM against the whitened means)
  knn/sklearn       sklearn NearestNeighbors(algorithm="brute") on L2-normalised rows
  knn/numpy         blocked GEMM + np.partition
FLOP time = the scoring GEMMs' FLOPs at the sgemm rate numpy/BLAS reaches here on the same shape.
Scores of mood and of the references are compared (max relative difference printed).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run_mood(binary, threads, args):
    out = subprocess.run([binary, "--threads", str(threads)] + args, check=True, capture_output=True, text=True)
    m = re.search(r"in ([0-9.]+) s", out.stderr)
    return float(m.group(1))


def sgemm_rate(np, m, k, n):
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    a @ b
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mood", default=os.path.join(ROOT, "target", "release", "mood"))
    ap.add_argument("--loop-classes", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a tenth of the rows (a smoke test)")
    a = ap.parse_args()
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(a.threads)
    import numpy as np  # after the thread limits
    from scipy.linalg import pinvh
    from sklearn.neighbors import NearestNeighbors

    scale = 10 if a.quick else 1
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="mood-bench-ood-")
    print(f"threads {a.threads}; data in {tmp}")

    # --- Mahalanobis ---------------------------------------------------------------------------
    c, d, per, n_test = 1000, 1024, 50 // (1 if scale == 1 else 5), 50_000 // scale
    labels = np.repeat(np.arange(c), per)
    centres = rng.standard_normal((c, d), dtype=np.float32)
    train = centres[labels] + rng.standard_normal((len(labels), d), dtype=np.float32)
    test = centres[rng.integers(0, c, n_test)] + 1.5 * rng.standard_normal((n_test, d), dtype=np.float32)
    for name, x, y in (("maha_train", train, labels), ("maha_test", test, None)):
        os.makedirs(os.path.join(tmp, name))
        np.save(os.path.join(tmp, name, "features.npy"), x)
        if y is not None:
            np.save(os.path.join(tmp, name, "labels.npy"), y.astype(np.int64))
    det = os.path.join(tmp, "maha.safetensors")
    t_fit = run_mood(a.mood, a.threads, ["fit", "--method", "mahalanobis", "--train", os.path.join(tmp, "maha_train"), "-o", det])
    out = os.path.join(tmp, "maha_scores.npy")
    t_mood = min(run_mood(a.mood, a.threads, ["score", "--detector", det, "--features", os.path.join(tmp, "maha_test"), "-o", out])
                 for _ in range(2))
    ours = np.load(out)

    t = time.perf_counter()
    f64 = train.astype(np.float64)
    mu = np.stack([f64[labels == k].mean(0) for k in range(c)])
    cen = f64 - mu[labels]
    prec = pinvh(cen.T @ cen / len(f64))
    t_np_fit = time.perf_counter() - t
    p32, mu32 = prec.astype(np.float32), mu.astype(np.float32)
    t = time.perf_counter()
    part = np.stack([((test - mu32[k]) @ p32 * (test - mu32[k])).sum(1) for k in range(a.loop_classes)], 1)
    t_loop = (time.perf_counter() - t) * c / a.loop_classes
    lam, vec = np.linalg.eigh(prec)
    keep = lam > lam.max() * d * np.finfo(np.float64).eps
    w = (vec[:, keep] * np.sqrt(lam[keep])).T.astype(np.float32)  # P = W^T W
    t = time.perf_counter()
    z = test @ w.T
    m = mu32 @ w.T
    dist = (z * z).sum(1)[:, None] - 2 * z @ m.T + (m * m).sum(1)[None]
    ref = -dist.min(1)
    t_gemm = time.perf_counter() - t
    rank = int(keep.sum())
    flops = 2.0 * n_test * d * rank + 2.0 * n_test * rank * c
    rate = sgemm_rate(np, n_test, d, rank)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    loop_rel = np.abs(-part.min(1) - (-dist[:, : a.loop_classes].min(1))).max() / np.abs(ref).max()
    print(f"\nmahalanobis: {c} classes, d = {d}, {len(train)} train rows, {n_test} test rows (rank {rank})")
    print(f"  mood fit {t_fit:.2f} s (numpy/scipy fit {t_np_fit:.2f} s)")
    print(f"  mood score {t_mood:.3f} s; numpy class loop {t_loop:.1f} s (extrapolated from {a.loop_classes} classes) "
          f"-> {t_loop / t_mood:.1f}x; numpy GEMM algebra {t_gemm:.2f} s -> {t_gemm / t_mood:.2f}x")
    print(f"  FLOP time at numpy's sgemm rate ({rate / 1e9:.1f} GFLOP/s): {flops / rate:.3f} s -> mood takes "
          f"{t_mood / (flops / rate):.2f}x the FLOP time; max |mood - numpy| / max|score| = {rel:.1e} "
          f"(class loop vs GEMM algebra on its {a.loop_classes} classes: {loop_rel:.1e})")

    # --- kNN -------------------------------------------------------------------------------------
    n, d, q, k = 100_000 // scale, 768, 10_000 // scale, 50
    train = rng.standard_normal((n, d), dtype=np.float32)
    queries = np.concatenate([train[: q // 2] + 0.3 * rng.standard_normal((q // 2, d), dtype=np.float32),
                              rng.standard_normal((q - q // 2, d), dtype=np.float32)])
    for name, x in (("knn_train", train), ("knn_test", queries)):
        os.makedirs(os.path.join(tmp, name))
        np.save(os.path.join(tmp, name, "features.npy"), x)
    det = os.path.join(tmp, "knn.safetensors")
    t_fit = run_mood(a.mood, a.threads, ["fit", "--method", "knn", "--method-arg", f"k={k}", "--train", os.path.join(tmp, "knn_train"), "-o", det])
    out = os.path.join(tmp, "knn_scores.npy")
    t_mood = min(run_mood(a.mood, a.threads, ["score", "--detector", det, "--features", os.path.join(tmp, "knn_test"), "-o", out])
                 for _ in range(2))
    ours = np.load(out)
    norm = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)  # noqa: E731
    tn, qn = norm(train), norm(queries)
    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(tn)
    dist_sk, _ = nn.kneighbors(qn)
    t_sk = time.perf_counter() - t
    t = time.perf_counter()
    kth = []
    for s in range(0, q, 1024):
        dots = qn[s:s + 1024] @ tn.T
        kth.append(np.partition(dots, n - k, axis=1)[:, n - k])
    ref = -(2 - 2 * np.concatenate(kth))
    t_np = time.perf_counter() - t
    np_rel = np.abs(ref - (-(dist_sk[:, -1] ** 2))).max() / np.abs(ref).max()
    flops = 2.0 * q * n * d
    rate = sgemm_rate(np, 1024, d, n // 10)
    rel = np.abs(ours - (-(dist_sk[:, -1] ** 2))).max() / np.abs(ours).max()
    print(f"\nknn: k = {k}, {n} train rows, d = {d}, {q} queries")
    print(f"  mood fit {t_fit:.2f} s; mood score {t_mood:.2f} s; sklearn brute {t_sk:.2f} s -> {t_sk / t_mood:.2f}x; "
          f"numpy GEMM + partition {t_np:.2f} s -> {t_np / t_mood:.2f}x")
    print(f"  FLOP time at numpy's sgemm rate ({rate / 1e9:.1f} GFLOP/s): {flops / rate:.2f} s -> mood takes "
          f"{t_mood / (flops / rate):.2f}x the FLOP time; max |mood - sklearn| / max|score| = {rel:.1e} (numpy vs sklearn {np_rel:.1e})")


if __name__ == "__main__":
    main()
