#!/usr/bin/env python3
"""References for mood's logistic regression (src/ood/logistic.rs) and `mahalanobis-ensemble
weights=lr` in tests/ood_reference.rs, from scikit-learn; none comes from mood.

1. lr_plain_*: 160 rows of 3 features on different scales (as per-layer Mahalanobis scores are),
   two overlapping classes; for C in (0.01, 1, 100): sklearn LogisticRegression(C=C) fitted with
   solver="newton-cholesky", tol=1e-12 (the exact optimum of the same objective), and the lbfgs
   fit with tol=1e-10 beside it as a cross-check (printed).
     lr_plain_x.npy [160, 3] float64, lr_plain_t.npy [160] float64 (1/0),
     lr_plain_expected.npy [3, 5] float64: per C, (C, w_1, w_2, w_3, b)
2. lr_ens_*: OpenOOD's mds_ensemble alpha selection on the multi-layer fixture
   (make_multilayer_fixtures.py's layers_train / layers_labels): per class, the train row j (in
   store order) is held out as ID validation when floor((j+1)/10) > floor(j/10); the class means
   and tied covariance (biased, pinvh) of each layer come from the other rows; each layer's score
   is max_c -0.5 (x - mu_c)^T P (x - mu_c); the OOD validation rows are lr_ens_valood.npy
   (made here). LogisticRegressionCV(scoring="accuracy") with its defaults (Cs=10, 5 stratified
   folds, lbfgs) on [ID held-out rows (1); OOD rows (0)], as OpenOOD's alpha_selector:
     lr_ens_valood.npy [40, 3, 16] float32 OOD validation rows
     lr_ens_x.npy [70, 3] float64 per-layer scores, lr_ens_t.npy [70] float64
     lr_ens_folds.npy [70] float64 StratifiedKFold(5) test fold of each row
     lr_ens_expected.npy [5] float64: (C_, w_1, w_2, w_3, b) where C_ is LogisticRegressionCV's
       choice and (w, b) the exact optimum at C_ (newton-cholesky, tol=1e-12; LRCV's own lbfgs
       refit at tol=1e-4 is printed beside it)
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
from scipy.linalg import pinvh  # noqa: E402
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ood")


def exact(x, t, c):
    m = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(x, t)
    return m.coef_.reshape(-1), m.intercept_[0]


def plain():
    rng = np.random.default_rng(5)
    n = 160
    t = (np.arange(n) % 3 != 0).astype(np.float64)
    scale = np.array([1.0, 10.0, 40.0])
    x = (rng.normal(0.0, 1.0, (n, 3)) + 0.8 * t[:, None] * np.array([1.0, -0.5, 0.3])) * scale - 5.0
    rows = []
    for c in (0.01, 1.0, 100.0):
        w, b = exact(x, t, c)
        lb = LogisticRegression(C=c, tol=1e-10, max_iter=100000).fit(x, t)
        print(f"plain C={c}: w {w}, b {b:.6f}; lbfgs differs by "
              f"{np.abs(lb.coef_.reshape(-1) - w).max():.1e} / {abs(lb.intercept_[0] - b):.1e}")
        rows.append([c, *w, b])
    np.save(os.path.join(OUT, "lr_plain_x.npy"), x)
    np.save(os.path.join(OUT, "lr_plain_t.npy"), t)
    np.save(os.path.join(OUT, "lr_plain_expected.npy"), np.array(rows))


def layer_scores(train, y, rows):
    out = []
    for k in range(train.shape[1]):
        f = train[:, k].astype(np.float64)
        mu = np.stack([f[y == c].mean(0) for c in range(y.max() + 1)])
        cen = f - mu[y]
        prec = pinvh(cen.T @ cen / len(f))
        r = rows[:, k].astype(np.float64)
        d = np.stack([np.einsum("ij,jk,ik->i", r - m, prec, r - m) for m in mu], 1)
        out.append((-0.5 * d).max(1))
    return np.stack(out, 1)


def ensemble():
    train = np.load(os.path.join(OUT, "layers_train.npy"))
    y = np.load(os.path.join(OUT, "layers_labels.npy")).astype(np.int64)
    held = np.zeros(len(y), dtype=bool)
    for c in range(y.max() + 1):
        idx = np.flatnonzero(y == c)
        j = np.arange(len(idx))
        held[idx[(j + 1) // 10 > j // 10]] = True
    # OOD validation rows: near the ID classes but wider, so that the layers' scores overlap.
    rng = np.random.default_rng(23)
    pick = rng.integers(0, len(train), 40)
    valood = (train[pick] + rng.normal(0.0, 0.6, (40,) + train.shape[1:]) * np.array([0.5, 1.0, 2.0])[None, :, None])
    valood = valood.astype(np.float32)
    keep = ~held
    s_id = layer_scores(train[keep], y[keep], train[held])
    s_ood = layer_scores(train[keep], y[keep], valood)
    x = np.concatenate([s_id, s_ood])
    t = np.concatenate([np.ones(len(s_id)), np.zeros(len(s_ood))])
    folds = np.zeros(len(t))
    for f, (_, test) in enumerate(StratifiedKFold(5).split(x, t)):
        folds[test] = f
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = LogisticRegressionCV(scoring="accuracy").fit(x, t)
    c = float(cv.C_[0])
    mean_acc = cv.scores_[1].mean(0).reshape(-1)
    print(f"ensemble: {len(s_id)} ID held-out rows, {len(s_ood)} OOD rows; fold-mean accuracy per C "
          f"{np.round(mean_acc, 3)} -> C_ = {c:.4g}")
    # The same choice with every fold fitted to the optimum (what mood does).
    acc = np.zeros(10)
    for f in range(5):
        tr, te = folds != f, folds == f
        for k, ck in enumerate(cv.Cs_):
            w, b = exact(x[tr], t[tr], ck)
            acc[k] += np.mean(((x[te] @ w + b) > 0) == (t[te] == 1))
    assert int(np.argmax(acc)) == int(np.argmax(cv.scores_[1].sum(0).reshape(-1))), (acc, cv.scores_[1])
    w, b = exact(x, t, c)
    print(f"  exact w {w}, b {b:.6f}; LRCV's own refit (lbfgs, tol 1e-4) differs by "
          f"{np.abs(cv.coef_.reshape(-1) - w).max():.1e}")
    np.save(os.path.join(OUT, "lr_ens_valood.npy"), valood)
    np.save(os.path.join(OUT, "lr_ens_x.npy"), x)
    np.save(os.path.join(OUT, "lr_ens_t.npy"), t)
    np.save(os.path.join(OUT, "lr_ens_folds.npy"), folds)
    np.save(os.path.join(OUT, "lr_ens_expected.npy"), np.array([c, *w, b]))


if __name__ == "__main__":
    plain()
    ensemble()
