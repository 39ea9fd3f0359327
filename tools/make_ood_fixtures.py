#!/usr/bin/env python3
"""References for tests/ood_reference.rs from scikit-learn, scipy and numpy:

  metrics_<case>_{id,ood}.npy + metrics_<case>_expected.npy
      [roc_auc_score, average_precision_score (ID positive), average_precision_score (OOD positive,
       score -s), FPR@95 (MOODv2 rule, numpy transcription), detection error (numpy transcription)]
      cases: random, ties (scores rounded to 1 decimal), constant (all scores equal)
  metrics_<case>_variants.npy
      [FPR@95 by MOOD v1 (5th percentile), MOS (fpr_and_fdr_at_recall), OpenOOD v1.5 (roc_curve with
       OOD positive), knn-ood; trapezoid AUPR-In, AUPR-Out (precision_recall_curve + auc)]
  maha_<case>_{train,labels,test,expected}.npy
      class-conditional tied-covariance Mahalanobis (SPEC D3): scipy.linalg.pinvh of the pooled
      class-centred covariance; expected = -min_c (x-mu_c)^T P (x-mu_c) in float64.
      cases: full (n=400, d=24, 5 classes), singular (n=30 < d=48, 3 classes), c1000 (1000 classes)
  logits_{z,f,expected}.npy
      scipy.special softmax/logsumexp transcriptions of SPEC's logit scores, rows:
      msp (T=1), msp (T=1000), maxlogit, energy (T=1), energy (T=2), -entropy, gradnorm
  knn_{train,test,expected}.npy
      sklearn NearestNeighbors on L2-normalised features (x/(|x|+1e-10)); expected rows: minus the
      squared distance to the k-th neighbour for k = 1, 5, 50
  head_{train,test,w,b,expected}.npy
      ReAct (q = 0.99 and 0.90), ViM and Residual (DIM = 12 of D = 24) by a numpy transcription of
      SPEC D3 (np.linalg.pinv, np.linalg.eigh, np.quantile); rows: react99, react90, vim, residual
  kl_{train,test,expected}.npy
      KL-matching (SPEC D3) by a direct numpy loop over classes (class 9 never predicted on train)
  methods_{train,labels,test}.npy + methods_expected_<method>.npy
      the MOOD v1 feature scores (SPEC D1) on L2-normalised features: mood-v1 (pinvh of np.cov
      bias=True), mahalanobis-cc/-avgcc (per-class pinvh, min/mean), euclidean, minkowski (L1),
      chebyshev, cos and projection (1-NN cosine), gauss (sklearn ledoit_wolf + pinvh), kmeans
      (k = 3, sklearn KMeans on well-separated clusters); singular_{train,labels,test} +
      singular_expected_<method>.npy: the same per-class scores with d = 40 > 12 rows per class
  csd_{train,test,fcnorm_w,fcnorm_b,expected}.npy
      MODE's CSD (SPEC E) on a 5x5 token grid: torch adaptive_avg_pool2d for the quadrants, LayerNorm
      (eps 1e-6), sklearn NearestNeighbors on the pooled 6n vectors, k = 10
  mos_{z,expected}.npy
      MOS (SPEC F): groups [3, 2, 4] with 'others' first in each slice, scipy softmax per slice
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
from scipy.linalg import pinvh  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ood")


def fpr95(id_s, ood_s):
    r = int(np.floor(0.95 * len(id_s)))
    t = np.sort(id_s)[::-1][max(r, 1) - 1]
    return float(np.sum(ood_s >= t) / len(ood_s))


def det_err(id_s, ood_s):
    best = 0.5
    for d in np.concatenate([id_s, ood_s]):
        best = min(best, 0.5 * (np.mean(id_s < d) + np.mean(ood_s >= d)))
    return best


def fpr_variants(id_s, ood_s):
    """SPEC G's other FPR@95 rules, transcribed from their repositories, and trapezoid AUPR."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve
    id_s, ood_s = id_s.astype(np.float64), ood_s.astype(np.float64)
    moodv1 = np.sum(ood_s > np.percentile(id_s, 5)) / len(ood_s)
    # MOS / Hendrycks fpr_and_fdr_at_recall
    y = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])
    s = np.concatenate([id_s, ood_s])
    order = np.argsort(s, kind="mergesort")[::-1]
    s, yy = s[order], y[order]
    thr_idx = np.r_[np.where(np.diff(s))[0], yy.size - 1]
    tps = np.cumsum(yy)[thr_idx]
    fps = 1 + thr_idx - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps_r = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    mos = fps_r[np.argmin(np.abs(recall - 0.95))] / np.sum(np.logical_not(y))
    # OpenOOD v1.5: OOD positive, -s
    fpr, tpr, _ = roc_curve(1 - y, -np.concatenate([id_s, ood_s]))
    openood = fpr[np.argmax(tpr >= 0.95)]
    # knn-ood
    knn = np.sum(ood_s > np.sort(id_s)[int(round(0.05 * len(id_s)))]) / len(ood_s)
    sc = np.concatenate([id_s, ood_s])
    p_in, r_in, _ = precision_recall_curve(y, sc)
    p_out, r_out, _ = precision_recall_curve(1 - y, -sc)
    return [moodv1, mos, openood, knn, auc(r_in, p_in), auc(r_out, p_out)]


def metrics(name, id_s, ood_s):
    id_s, ood_s = id_s.astype(np.float32), ood_s.astype(np.float32)
    y = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])
    s = np.concatenate([id_s, ood_s]).astype(np.float64)
    exp = [roc_auc_score(y, s), average_precision_score(y, s), average_precision_score(1 - y, -s),
           fpr95(id_s, ood_s), det_err(id_s, ood_s)]
    np.save(os.path.join(OUT, f"metrics_{name}_id.npy"), id_s)
    np.save(os.path.join(OUT, f"metrics_{name}_ood.npy"), ood_s)
    np.save(os.path.join(OUT, f"metrics_{name}_expected.npy"), np.array(exp, dtype=np.float64))
    np.save(os.path.join(OUT, f"metrics_{name}_variants.npy"), np.array(fpr_variants(id_s, ood_s), dtype=np.float64))
    print(name, exp)


def maha(name, n, d, c, n_test, rng):
    centres = rng.normal(0, 3, size=(c, d))
    labels = np.arange(n) % c
    train = (centres[labels] + rng.normal(0, 1, size=(n, d)) @ rng.normal(0, 1, size=(d, d)) / np.sqrt(d)).astype(np.float32)
    test = (centres[rng.integers(0, c, n_test)] + 2 * rng.normal(0, 1, size=(n_test, d))).astype(np.float32)
    f = train.astype(np.float64)
    mu = np.stack([f[labels == k].mean(0) for k in range(c)])
    cen = f - mu[labels]
    prec = pinvh(cen.T @ cen / n)
    diff = test.astype(np.float64)[:, None, :] - mu[None]
    dist = np.einsum("ncd,de,nce->nc", diff, prec, diff)
    exp = -dist.min(1)
    for k, v in (("train", train), ("labels", labels.astype(np.float32)), ("test", test), ("expected", exp)):
        np.save(os.path.join(OUT, f"maha_{name}_{k}.npy"), v if k == "expected" else v.astype(np.float32))
    print(name, "score range", exp.min(), exp.max())


def logit_scores(rng):
    from scipy.special import logsumexp, softmax
    z = (rng.normal(0, 3, size=(64, 10)) + np.array([8.0] + [0.0] * 9) * (rng.random((64, 1)) < 0.5)).astype(np.float32)
    z[0] = 5.0  # a row of ties
    f = rng.normal(0, 1, size=(64, 12)).astype(np.float32)
    zd = z.astype(np.float64)
    p = softmax(zd, axis=1)
    exp = np.stack([
        p.max(1),
        softmax(zd / 1000.0, axis=1).max(1),
        zd.max(1),
        logsumexp(zd, axis=1),
        2.0 * logsumexp(zd / 2.0, axis=1),
        (p * np.log(p)).sum(1),
        np.abs(f.astype(np.float64)).sum(1) * np.abs(10 * p - 1).sum(1),
    ])
    np.save(os.path.join(OUT, "logits_z.npy"), z)
    np.save(os.path.join(OUT, "logits_f.npy"), f)
    np.save(os.path.join(OUT, "logits_expected.npy"), exp)


def knn(rng):
    from sklearn.neighbors import NearestNeighbors
    train = rng.normal(0, 1, size=(500, 32)).astype(np.float32)
    test = np.concatenate([train[:20] + 0.1 * rng.normal(0, 1, size=(20, 32)), rng.normal(0, 1, size=(30, 32))]).astype(np.float32)
    norm = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)  # noqa: E731
    nn = NearestNeighbors(n_neighbors=50).fit(norm(train.astype(np.float64)))
    dist, _ = nn.kneighbors(norm(test.astype(np.float64)))
    exp = np.stack([-(dist[:, k - 1] ** 2) for k in (1, 5, 50)])
    np.save(os.path.join(OUT, "knn_train.npy"), train)
    np.save(os.path.join(OUT, "knn_test.npy"), test)
    np.save(os.path.join(OUT, "knn_expected.npy"), exp)


def head_scores(rng):
    from scipy.special import logsumexp
    d, c = 24, 10
    w = rng.normal(0, 0.3, size=(c, d)).astype(np.float32)
    b = rng.normal(0, 0.5, size=c).astype(np.float32)
    train = np.abs(rng.normal(0, 1, size=(300, d)) @ rng.normal(0, 1, size=(d, d)) / 3).astype(np.float32)
    test = np.abs(rng.normal(0, 1.3, size=(60, d))).astype(np.float32)
    W, B, F, X = (a.astype(np.float64) for a in (w, b, train, test))
    exp = []
    for q in (0.99, 0.90):
        clip = np.quantile(train.reshape(-1), q)
        exp.append(logsumexp(np.minimum(X, clip) @ W.T + B, axis=1))
    u = -np.linalg.pinv(W) @ B
    cov = (F - u).T @ (F - u) / len(F)
    lam, vec = np.linalg.eigh(cov)
    ns = vec[:, np.argsort(lam)[::-1][12:]]
    r_train = np.linalg.norm((F - u) @ ns, axis=1)
    alpha = (F @ W.T + B).max(1).mean() / r_train.mean()
    r = np.linalg.norm((X - u) @ ns, axis=1)
    exp.append(-alpha * r + logsumexp(X @ W.T + B, axis=1))
    exp.append(-r)
    for k, v in (("train", train), ("test", test), ("w", w), ("b", b)):
        np.save(os.path.join(OUT, f"head_{k}.npy"), v)
    np.save(os.path.join(OUT, "head_expected.npy"), np.stack(exp))


def kl_matching(rng):
    from scipy.special import softmax
    c = 10
    train = rng.normal(0, 2, size=(400, c)).astype(np.float32)
    train[:, 9] -= 20  # class 9 is never the argmax: its template is zero, its KL infinite
    test = rng.normal(0, 2, size=(50, c)).astype(np.float32)
    p_tr, p_te = softmax(train.astype(np.float64), 1), softmax(test.astype(np.float64), 1)
    yhat = p_tr.argmax(1)
    exp = []
    for p in p_te:
        kls = []
        for k in range(c):
            if not np.any(yhat == k):
                continue
            q = p_tr[yhat == k].mean(0)
            m = p > 0
            kls.append(np.sum(p[m] * np.log(p[m] / q[m])))
        exp.append(-min(kls))
    for k, v in (("train", train), ("test", test)):
        np.save(os.path.join(OUT, f"kl_{k}.npy"), v)
    np.save(os.path.join(OUT, "kl_expected.npy"), np.array(exp))


def norm_rows(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def sq_mahal(x, mu, prec):
    diff = x - mu
    return np.einsum("nd,de,ne->n", diff, prec, diff)


def feature_methods(prefix, train, labels, test, with_all=True):
    from sklearn.cluster import KMeans
    from sklearn.covariance import ledoit_wolf
    F, X = norm_rows(train.astype(np.float64)), norm_rows(test.astype(np.float64))
    c = labels.max() + 1
    exp = {}
    per_class = np.stack([sq_mahal(X, F[labels == k].mean(0), pinvh(np.cov(F[labels == k].T, bias=True)))
                          for k in range(c)], 1)
    exp["mahalanobis-cc"] = -per_class.min(1)
    exp["mahalanobis-avgcc"] = -per_class.mean(1)
    if with_all:
        mu = F.mean(0)
        exp["mood-v1"] = -sq_mahal(X, mu, pinvh(np.cov(F.T, bias=True)))
        exp["euclidean"] = -np.linalg.norm(X - mu, axis=1)
        exp["minkowski"] = -np.abs(X - mu).sum(1)
        exp["chebyshev"] = -np.abs(X - mu).max(1)
        cos = (X @ F.T).max(1)
        exp["cos"] = cos
        exp["projection"] = cos * np.linalg.norm(X, axis=1) ** 2
        exp["gauss"] = -sq_mahal(X, mu, pinvh(ledoit_wolf(F)[0]))
        km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(F)
        exp["kmeans"] = -km.transform(X).min(1)
    for k, v in (("train", train), ("labels", labels.astype(np.float32)), ("test", test)):
        np.save(os.path.join(OUT, f"{prefix}_{k}.npy"), v.astype(np.float32))
    for name, v in exp.items():
        np.save(os.path.join(OUT, f"{prefix}_expected_{name}.npy"), v)


def methods(rng):
    d, c = 16, 3
    # Three well-separated directions, so k-means (k = 3) has one clear solution.
    centres = 4 * np.eye(c, d) + 0.3 * rng.normal(0, 1, size=(c, d))
    labels = np.arange(240) % c
    train = centres[labels] + rng.normal(0, 0.5, size=(240, d)) @ rng.normal(0, 1, size=(d, d)) / np.sqrt(d)
    test = np.concatenate([centres[rng.integers(0, c, 40)] + rng.normal(0, 0.8, size=(40, d)),
                           rng.normal(0, 2, size=(20, d))])
    feature_methods("methods", train, labels, test)
    labels = np.arange(36) % 3
    train = rng.normal(0, 1, size=(36, 40)) + 2 * np.eye(3, 40)[labels]
    test = rng.normal(0, 1, size=(25, 40))
    feature_methods("singular", train, labels, test, with_all=False)


def csd(rng):
    import torch
    from sklearn.neighbors import NearestNeighbors
    h, d = 5, 8
    train = rng.normal(0, 1, size=(60, h * h, d)).astype(np.float32)
    test = np.concatenate([train[:10] + 0.2 * rng.normal(0, 1, size=(10, h * h, d)),
                           rng.normal(0.5, 1.5, size=(15, h * h, d))]).astype(np.float32)
    w = rng.normal(1, 0.2, size=d).astype(np.float32)
    b = rng.normal(0, 0.2, size=d).astype(np.float32)

    def scales(local):
        x = torch.from_numpy(local.astype(np.float64)).reshape(-1, h, h, d).permute(0, 3, 1, 2)
        quads = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).permute(0, 2, 1)  # [n, 4, d]
        glob = x.mean((2, 3))[:, None]
        c0 = h // 4
        centre = x[:, :, c0:h - c0, c0:h - c0].mean((2, 3))[:, None]
        v = torch.cat([quads, glob, centre], 1)
        v = torch.nn.functional.layer_norm(v, (d,), torch.from_numpy(w.astype(np.float64)),
                                           torch.from_numpy(b.astype(np.float64)), eps=1e-6).numpy()
        v = v / (np.linalg.norm(v, axis=2, keepdims=True) + 1e-10)
        return v

    pool = scales(train).reshape(-1, d)
    q = scales(test)
    nn = NearestNeighbors(n_neighbors=10).fit(pool)
    dist, _ = nn.kneighbors(q.reshape(-1, d))
    exp = (-(dist[:, 9] ** 2)).reshape(-1, 6).max(1)
    for k, v in (("train", train), ("test", test), ("fcnorm_w", w), ("fcnorm_b", b)):
        np.save(os.path.join(OUT, f"csd_{k}.npy"), v)
    np.save(os.path.join(OUT, "csd_expected.npy"), exp)


def mos(rng):
    from scipy.special import softmax
    groups = [3, 2, 4]
    z = rng.normal(0, 2, size=(40, sum(g + 1 for g in groups))).astype(np.float32)
    others, start = [], 0
    for g in groups:
        others.append(softmax(z[:, start:start + g + 1].astype(np.float64), axis=1)[:, 0])
        start += g + 1
    np.save(os.path.join(OUT, "mos_z.npy"), z)
    np.save(os.path.join(OUT, "mos_expected.npy"), -np.min(np.stack(others, 1), 1))


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(7)
    metrics("random", rng.normal(1, 1, 300), rng.normal(0, 1, 250))
    metrics("ties", np.round(rng.normal(1, 1, 200), 1), np.round(rng.normal(0, 1, 180), 1))
    metrics("constant", np.zeros(50), np.zeros(40))
    maha("full", 400, 24, 5, 100, rng)
    maha("singular", 30, 48, 3, 40, rng)
    maha("c1000", 3000, 16, 1000, 50, rng)
    logit_scores(rng)
    knn(rng)
    head_scores(rng)
    kl_matching(rng)
    methods(rng)
    csd(rng)
    mos(rng)


if __name__ == "__main__":
    main()
