#!/usr/bin/env python3
"""References for the multi-layer methods in tests/ood_reference.rs (`mahalanobis-ensemble`,
`gram`; docs/methods.md has each definition and its source), written out in float64 numpy/scipy
from the papers and OpenOOD v1.5's mds_ensemble_postprocessor.py and gram_postprocessor.py; none
comes from mood.

One shared random set (tests/fixtures/ood/layers_*.npy), shaped as `mood extract --layers` writes
layers.npy:
  layers_train.npy   [300, 3, 16] float32: three blocks' pooled features, class-dependent, of
                     mixed sign (a ViT's token means are not post-ReLU)
  layers_labels.npy  [300] float32 class labels 0..5
  layers_logits.npy  [300, 6] float32 train logits (a noisy read-out of the classes)
  layers_test.npy    [90, 3, 16], layers_test_logits.npy [90, 6]: 60 rows like train, 30 shifted
and layers_expected_<case>.npy (float64, one score per test row).

mahalanobis-ensemble (Lee et al. 2018, OpenOOD's mds_ensemble without input preprocessing): per
layer, class means and one tied covariance of the class-centred rows (biased, as sklearn's
EmpiricalCovariance), precision = scipy's pinvh (sklearn's precision_); the layer's score is
max_c -0.5 (x - mu_c)^T P (x - mu_c); the layers' scores are summed with weights (OpenOOD's
alpha_list, 1 per layer by default).

gram (Sastry & Oore 2020, OpenOOD's gram): each layer's pooled vector x [D] is a feature map with
one position, so its order-p Gram matrix is x^p (x^p)^T, whose row sums OpenOOD keeps:
g_i = sign(s_i) |s_i|^(1/p) with s_i = x_i^p * sum_j x_j^p. Per layer, power and class, the minimum
and maximum of g over the class's train rows, except a held-out tenth (OpenOOD draws it at random;
here, of the class's rows in store order, row j is held out when floor((j+1)/10) > floor(j/10));
delta(min, max, g) = sum_i relu(min_i - g_i)/|min_i + 1e-6| + relu(g_i - max_i)/|max_i + 1e-6|.
Each layer's normaliser is the mean over the held-out rows of sum_p delta (their own class's
ranges). Score = -(sum_l sum_p delta_{l,p,pred}(g) / norm_l) / max softmax, pred = argmax logit.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
from scipy.linalg import pinvh  # noqa: E402
from scipy.special import softmax  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ood")
N, M, L, D, C = 300, 90, 3, 16, 6


def data():
    rng = np.random.default_rng(17)
    centres = rng.normal(0.0, 1.0, (C, L, D))
    scales = np.array([0.5, 1.0, 2.0])[None, :, None]
    y = np.arange(N) % C
    train = (centres[y] + rng.normal(0.0, 0.7, (N, L, D))) * scales
    yt = np.arange(60) % C
    near = (centres[yt] + rng.normal(0.0, 0.7, (60, L, D))) * scales
    far = rng.normal(0.3, 1.5, (30, L, D)) * scales
    test = np.concatenate([near, far])
    w = centres.reshape(C, L * D).T + rng.normal(0.0, 0.5, (L * D, C))
    logits = lambda x: 0.4 * x.reshape(len(x), L * D) @ w / np.sqrt(L * D)  # noqa: E731
    return (train.astype(np.float32), y, logits(train).astype(np.float32),
            test.astype(np.float32), logits(test).astype(np.float32))


def mds_ensemble(train, y, test, weights):
    total = np.zeros(len(test))
    for l in range(L):
        f = train[:, l].astype(np.float64)
        x = test[:, l].astype(np.float64)
        means = np.stack([f[y == c].mean(0) for c in range(C)])
        centred = f - means[y]
        prec = pinvh(centred.T @ centred / len(f))
        md = np.stack([np.einsum("ij,jk,ik->i", x - means[c], prec, x - means[c]) for c in range(C)], 1)
        total += weights[l] * np.max(-0.5 * md, axis=1)
    return total


def gram_feature(x, p):
    s = x**p * np.sum(x**p, axis=1, keepdims=True)
    return np.sign(s) * np.abs(s) ** (1.0 / p)


def delta(mins, maxs, g):
    return (np.sum(np.maximum(mins - g, 0) / np.abs(mins + 1e-6), axis=-1)
            + np.sum(np.maximum(g - maxs, 0) / np.abs(maxs + 1e-6), axis=-1))


def held_out(n, fraction=0.1):
    i = np.arange(n)
    return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def gram(train, y, test, test_logits, powers):
    pred = test_logits.astype(np.float64).argmax(1)
    conf = softmax(test_logits.astype(np.float64), axis=1).max(1)
    dev = np.zeros(len(test))
    for l in range(L):
        f = train[:, l].astype(np.float64)
        x = test[:, l].astype(np.float64)
        ranges, val_dev = {}, []
        for c in range(C):
            rows = np.where(y == c)[0]
            out = held_out(len(rows))
            fit_rows, val_rows = rows[~out], rows[out]
            class_dev = np.zeros(len(val_rows))
            for p in powers:
                g = gram_feature(f[fit_rows], p)
                ranges[c, p] = (g.min(0), g.max(0))
                class_dev += delta(*ranges[c, p], gram_feature(f[val_rows], p))
            val_dev.append(class_dev)
        norm = np.concatenate(val_dev).mean()
        for p in powers:
            g = gram_feature(x, p)
            for c in range(C):
                sel = pred == c
                dev[sel] += delta(*ranges[c, p], g[sel]) / norm
    return -dev / conf


def main():
    train, y, train_logits, test, test_logits = data()
    print(f"train accuracy of the logits: {np.mean(train_logits.argmax(1) == y):.3f}")
    cases = {
        "mds_ensemble": mds_ensemble(train, y, test, [1.0, 1.0, 1.0]),
        "mds_ensemble_w": mds_ensemble(train, y, test, [0.5, -1.0, 2.0]),
        "gram": gram(train, y, test, test_logits, [1, 2, 3, 4, 5]),
        "gram_p13": gram(train, y, test, test_logits, [1, 3]),
    }
    os.makedirs(OUT, exist_ok=True)
    np.save(os.path.join(OUT, "layers_train.npy"), train)
    np.save(os.path.join(OUT, "layers_labels.npy"), y.astype(np.float32))
    np.save(os.path.join(OUT, "layers_logits.npy"), train_logits)
    np.save(os.path.join(OUT, "layers_test.npy"), test)
    np.save(os.path.join(OUT, "layers_test_logits.npy"), test_logits)
    for name, s in cases.items():
        assert np.all(np.isfinite(s)), name
        np.save(os.path.join(OUT, f"layers_expected_{name}.npy"), s.astype(np.float64))
        print(f"{name}: {s[:3]} ... {s[-3:]}")


if __name__ == "__main__":
    main()
