#!/usr/bin/env python3
"""OOD scoring at benchmark scale: `mood fit` + `mood score` against numpy / scikit-learn references
on the same data, threads and machine, printed as ratios (issue: OOD library performance).

    python3 tools/bench_ood.py [--threads 2] [--quick]
    python3 tools/bench_ood.py --posthoc [ash-b,scale,...] [--threads 2]

--posthoc times OpenOOD v1.5's post-hoc methods that score with a GEMM (docs/methods.md), and the
multi-layer ones (mahalanobis-ensemble, gram: three blocks of --dim each, as `mood bench` makes
them), at 50,000 x 1024 against 1000 classes (--size ROWS,DIM,CLASSES,TRAIN_ROWS to change it): `mood bench --ood NAME --json` (its median scoring time) beside
numpy's time for the same formula on data of the same shape, written as a numpy user (or OpenOOD's
torch code) would: one matrix product for the head, vectorised row operations, GEMM algebra for the
Mahalanobis distances of rmds. Printed as numpy time / mood time.

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
import json  # noqa: E402
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


POSTHOC = ["ash-p", "ash-b", "ash-s", "scale", "dice", "fdbd", "nci", "rmds", "she", "t2fnorm", "nnguide",
           "mahalanobis-ensemble", "gram"]
LAYERED = ("mahalanobis-ensemble", "gram")


def posthoc(a):
    import numpy as np  # after the thread limits
    from scipy.linalg import pinvh
    from scipy.special import logsumexp, softmax

    n, d, c, n_train = (int(v) for v in a.size.split(","))
    rng = np.random.default_rng(0)
    means = rng.standard_normal((c, d), dtype=np.float32)
    y = np.arange(n_train) % c
    train = means[y] + rng.standard_normal((n_train, d), dtype=np.float32)
    x = means[np.arange(n) % c] + rng.standard_normal((n, d), dtype=np.float32)
    w = means / np.float32(np.sqrt(d))
    b = np.zeros(c, dtype=np.float32)
    mu = train.mean(0)
    k_ash = lambda p: d - int(np.round(d * p / 100.0))  # noqa: E731

    def ash(variant, p):
        k = k_ash(p)
        idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
        total = x.sum(1)
        kept = np.take_along_axis(x, idx, 1)
        out = x * np.exp(total / kept.sum(1))[:, None] if variant == "scale" else np.zeros_like(x)
        if variant == "p":
            np.put_along_axis(out, idx, kept, 1)
        elif variant == "b":
            np.put_along_axis(out, idx, np.repeat((total / k)[:, None], k, 1), 1)
        elif variant == "s":
            np.put_along_axis(out, idx, kept * np.exp(total / kept.sum(1))[:, None], 1)
        return logsumexp(out @ w.T + b, axis=1)

    contrib = mu[None, :] * w
    wm = w * (contrib > np.percentile(contrib, 90))
    gap = np.sqrt(np.maximum((w * w).sum(1)[:, None] + (w * w).sum(1)[None] - 2 * w @ w.T, 0))
    np.fill_diagonal(gap, 1.0)
    cm = np.stack([train[y == k].mean(0) for k in range(c)])
    prec = pinvh(np.cov((train - cm[y]).T, bias=True))
    lam, vec = np.linalg.eigh(prec)
    keep = lam > lam.max() * d * np.finfo(np.float64).eps
    wc = (vec[:, keep] * np.sqrt(lam[keep])).T.astype(np.float32)
    lam0, vec0 = np.linalg.eigh(pinvh(np.cov(train.T, bias=True)))
    keep0 = lam0 > lam0.max() * d * np.finfo(np.float64).eps
    w0 = (vec0[:, keep0] * np.sqrt(lam0[keep0])).T.astype(np.float32)
    mc, m0 = (cm - mu) @ wc.T, np.zeros(int(keep0.sum()), dtype=np.float32)
    pred_train = (train @ w.T + b).argmax(1)
    pat = np.stack([train[(y == k) & (pred_train == k)].mean(0) if np.any((y == k) & (pred_train == k))
                    else train[y == k].mean(0) for k in range(c)])
    m_bank = max(int(np.ceil(0.01 * n_train)), 1)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    bank = unit(train[(np.arange(m_bank) * n_train) // m_bank])
    bank = bank * logsumexp(train[(np.arange(m_bank) * n_train) // m_bank] @ w.T + b, axis=1)[:, None]

    def rmds():
        xc = x - mu
        z = xc @ wc.T
        md = (z * z).sum(1)[:, None] - 2 * z @ mc.T + (mc * mc).sum(1)[None]
        z0 = xc @ w0.T - m0
        return (z0 * z0).sum(1) - md.min(1)

    def fdbd():
        z = x @ w.T + b
        p = z.argmax(1)
        return (np.abs(z - z.max(1, keepdims=True)) / gap[p]).sum(1) / np.linalg.norm(x - mu, axis=1)

    def nci():
        z = x @ w.T + b
        p = z.argmax(1)
        proj = (x - mu) @ w.T
        return proj[np.arange(n), p] / np.linalg.norm(x - mu, axis=1) + 1e-4 * np.abs(x).sum(1)

    def nnguide():
        sims = unit(x) @ bank.T
        kk = min(100, m_bank)
        return np.partition(sims, m_bank - kk, axis=1)[:, m_bank - kk:].mean(1) * logsumexp(x @ w.T + b, axis=1)

    def whitening(f, y):
        """Class means and W with W^T W = pinvh(tied covariance), as mood's GEMM algebra."""
        cm = np.stack([f[y == k].mean(0) for k in range(c)])
        lam, vec = np.linalg.eigh(pinvh(np.cov((f - cm[y]).T, bias=True)))
        keep = lam > lam.max() * f.shape[1] * np.finfo(np.float64).eps
        return cm, (vec[:, keep] * np.sqrt(lam[keep])).T.astype(np.float32)

    names = a.posthoc.split(",") if a.posthoc != "all" else POSTHOC
    if any(m in LAYERED for m in names):
        # Three blocks, each [rows, d] around its own class means (a numpy user slices
        # layers.npy [n, L, D] into contiguous per-block arrays once).
        lmeans = [rng.standard_normal((c, d), dtype=np.float32) for _ in range(3)]
        ltrain = [mu[y] + rng.standard_normal((n_train, d), dtype=np.float32) for mu in lmeans]
        lx = [mu[np.arange(n) % c] + rng.standard_normal((n, d), dtype=np.float32) for mu in lmeans]
        lw = lmeans[2] / np.float32(np.sqrt(d))
        if "mahalanobis-ensemble" in names:
            white = [whitening(f, y) for f in ltrain]
            lm = [(cm @ wl.T).astype(np.float32) for cm, wl in white]
        if "gram" in names:
            powers = range(1, 6)

            def gram_feats(x, p):
                xp = x ** p
                s = xp * xp.sum(1, keepdims=True)
                return np.sign(s) * np.abs(s) ** np.float32(1.0 / p)

            ranges = [[(np.stack([gram_feats(f[y == k], p).min(0) for k in range(c)]),
                        np.stack([gram_feats(f[y == k], p).max(0) for k in range(c)])) for p in powers]
                      for f in ltrain]

    def mds_ensemble():
        total = 0.0
        for xl, (_, wl), ml in zip(lx, white, lm):
            z = xl @ wl.T
            dist = (z * z).sum(1)[:, None] - 2 * z @ ml.T + (ml * ml).sum(1)[None]
            total = total - 0.5 * dist.min(1)
        return total

    def gram():
        z = lx[2] @ lw.T
        pred = z.argmax(1)
        conf = softmax(z, axis=1).max(1)
        dev = 0.0
        for xl, per in zip(lx, ranges):
            for p, (lo, hi) in zip(powers, per):
                g = gram_feats(xl, p)
                lo_p, hi_p = lo[pred], hi[pred]
                dev = dev + (np.maximum(lo_p - g, 0) / np.abs(lo_p + 1e-6)
                             + np.maximum(g - hi_p, 0) / np.abs(hi_p + 1e-6)).sum(1)
        # Each layer's normaliser is a constant of the fit (1 here: the same work).
        return -dev / conf

    formulas = {
        "mahalanobis-ensemble": mds_ensemble, "gram": gram,
        "ash-p": lambda: ash("p", 90), "ash-b": lambda: ash("b", 90), "ash-s": lambda: ash("s", 90),
        "scale": lambda: ash("scale", 85),
        "dice": lambda: logsumexp(x @ wm.T + b, axis=1),
        "fdbd": fdbd, "nci": nci, "rmds": rmds, "nnguide": nnguide,
        "she": lambda: (x @ pat.T)[np.arange(n), (x @ w.T + b).argmax(1)],
        "t2fnorm": lambda: softmax((x / np.float32(0.1)) @ w.T + b, axis=1).max(1),
    }
    print(f"threads {a.threads}; {n} rows x {d}, {c} classes, {n_train} train rows")
    print("| method | mood score (s) | numpy (s) | numpy / mood |")
    print("|---|---|---|---|")
    for name in names:
        out = subprocess.run([a.mood, "--threads", str(a.threads), "bench", "--ood", name, "--rows", str(n),
                              "--dim", str(d), "--classes", str(c), "--train-rows", str(n_train),
                              "--iters", "3", "--json"],
                             check=True, capture_output=True, text=True)
        t_mood = json.loads(out.stdout)["median_s"]
        f = formulas[name]
        f()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        t_np = sorted(times)[1]
        print(f"| {name} | {t_mood:.3f} | {t_np:.3f} | {t_np / t_mood:.2f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mood", default=os.path.join(ROOT, "target", "release", "mood"))
    ap.add_argument("--loop-classes", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a tenth of the rows (a smoke test)")
    ap.add_argument("--posthoc", nargs="?", const="all", default=None,
                    help="time the post-hoc methods (a comma-separated list, default all) instead")
    ap.add_argument("--size", default="50000,1024,1000,10000",
                    help="--posthoc: ROWS,DIM,CLASSES,TRAIN_ROWS")
    a = ap.parse_args()
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(a.threads)
    if a.posthoc:
        return posthoc(a)
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
