#!/usr/bin/env python3
"""References for the post-hoc methods of OpenOOD v1.5 in tests/ood_reference.rs (docs/methods.md
has each definition and its source). Every formula is written out here in float64 numpy/scipy from
the papers and OpenOOD's postprocessors; none comes from mood.

One shared random set (tests/fixtures/ood/posthoc_*.npy):
  posthoc_train.npy   [400, 64] float32, non-negative (|N(class centre, 1)|, like post-ReLU features)
  posthoc_labels.npy  [400] float32 class labels 0..9
  posthoc_test.npy    [120, 64] float32: 80 rows like train, 40 from a shifted distribution
  posthoc_w.npy [10, 64], posthoc_b.npy [10]: a head that reads the classes (train accuracy < 100%)
and posthoc_expected_<case>.npy (float64, one score per test row) for the cases in CASES below;
posthoc_temperature.npy holds the temperature fitted by temp-scaling, and
posthoc_openmax_weibull.npy [C, 3] the (scale, shape, smallest tail value) of each class's
Weibull fit of the default OpenMax case, and posthoc_openmax_tails.npy [C, 20] the float64 tails
it was fitted on (NaN-padded where a class has fewer than 20 correctly classified rows).

OpenMax's Weibull fit is libMR's MetaRecognition::FitHigh (translate_amount 1, no scores dropped)
re-expressed from its C source: the tail shifted so its smallest value is 1, the Weibull maximum
likelihood fit of weibull.c (log data, rescaled to [-1, 0], the root of the profile likelihood
equation for the Gumbel scale, then the location) and W_score = the Weibull CDF at the shifted
distance (0 below the shift). libMR stops its root search at a tolerance of 1e-6 on the rescaled
problem; here the root is found to machine precision, so these are the exact maximum likelihood
estimates (libMR's own parameters differ from them by up to about that tolerance).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
from scipy.linalg import pinvh  # noqa: E402
from scipy.optimize import brentq, minimize_scalar  # noqa: E402
from scipy.spatial import distance as spd  # noqa: E402
from scipy.special import logsumexp, softmax  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ood")
N, M, D, C = 400, 120, 64, 10


def data():
    rng = np.random.default_rng(16)
    centres = np.abs(rng.normal(0.0, 1.5, (C, D)))
    y = np.arange(N) % C
    train = np.abs(centres[y] + rng.normal(0.0, 1.0, (N, D))).astype(np.float32)
    yt = np.arange(80) % C
    near = np.abs(centres[yt] + rng.normal(0.0, 1.0, (80, D)))
    far = np.abs(rng.normal(0.5, 1.5, (40, D)))
    test = np.concatenate([near, far]).astype(np.float32)
    w = (0.3 * (centres - centres.mean(0)) + rng.normal(0.0, 0.15, (C, D))).astype(np.float32)
    b = rng.normal(0.0, 0.5, C).astype(np.float32)
    return train, y, test, w, b


def logits(x, w, b):
    return x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)


def kept(x, percentile):
    """Indices of the k largest entries per row, k = D - round(D * p / 100) (numpy's round)."""
    d = x.shape[1]
    k = d - int(np.round(d * percentile / 100.0))
    return np.argsort(-x, axis=1, kind="stable")[:, :k], k


def ash(x, w, b, percentile, variant):
    x = x.astype(np.float64)
    idx, k = kept(x, percentile)
    rows = np.arange(len(x))[:, None]
    total = x.sum(1)
    shaped = np.zeros_like(x)
    shaped[rows, idx] = x[rows, idx]
    if variant == "b":
        shaped = np.zeros_like(x)
        shaped[rows, idx] = (total / k)[:, None]
    elif variant == "s":
        shaped = shaped * np.exp(total / shaped.sum(1))[:, None]
    elif variant == "scale":
        shaped = x * np.exp(total / shaped.sum(1))[:, None]
    return logsumexp(logits(shaped, w, b), axis=1)


def dice(train, x, w, b, p):
    contrib = train.astype(np.float64).mean(0)[None, :] * w.astype(np.float64)
    mask = contrib > np.percentile(contrib, p)
    z = x.astype(np.float64) @ (w * mask).T + b
    return logsumexp(z, axis=1)


def gen(z, gamma, m):
    p = np.sort(softmax(z, axis=1), axis=1)[:, -m:]
    return -np.sum(p**gamma * (1.0 - p) ** gamma, axis=1)


def fdbd(train, x, w, b, by_distance):
    w64 = w.astype(np.float64)
    z = logits(x, w, b)
    pred = z.argmax(1)
    score = np.zeros(len(x))
    for i in range(len(x)):
        diff = np.linalg.norm(w64 - w64[pred[i]], axis=1)
        diff[pred[i]] = 1.0
        score[i] = np.sum(np.abs(z[i] - z[i, pred[i]]) / diff)
    centre = train.astype(np.float64).mean(0) if by_distance else 0.0
    return score / np.linalg.norm(x - centre, axis=1)


def nci(train, x, w, b, alpha):
    mu = train.astype(np.float64).mean(0)
    pred = logits(x, w, b).argmax(1)
    c = x.astype(np.float64) - mu
    return (np.sum(w[pred] * c, axis=1) / np.linalg.norm(c, axis=1)
            + alpha * np.abs(x.astype(np.float64)).sum(1))


def nnguide(train, x, w, b, k, alpha):
    n = len(train)
    m = max(int(np.ceil(alpha * n)), 1)
    rows = (np.arange(m) * n) // m
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True) + 1e-10  # noqa: E731
    bank = unit(train[rows].astype(np.float64)) * logsumexp(logits(train[rows], w, b), axis=1)[:, None]
    sims = unit(x.astype(np.float64)) @ bank.T
    conf = np.sort(sims, axis=1)[:, -k:].mean(1)
    return conf * logsumexp(logits(x, w, b), axis=1)


def rmds(train, y, x):
    f = train.astype(np.float64)
    means = np.stack([f[y == c].mean(0) for c in range(C)])
    centred = f - means[y]
    prec = pinvh(np.cov(centred.T, bias=True))
    bg_mean = f.mean(0)
    bg_prec = pinvh(np.cov(f.T, bias=True))
    xb = x - bg_mean
    md_bg = np.einsum("ij,jk,ik->i", xb, bg_prec, xb)
    md = np.stack([np.einsum("ij,jk,ik->i", x - means[c], prec, x - means[c]) for c in range(C)], 1)
    return np.max(-(md - md_bg[:, None]), axis=1)


def she(train, y, x, w, b):
    f = train.astype(np.float64)
    pred = logits(train, w, b).argmax(1)
    patterns = np.stack([f[(y == c) & (pred == c)].mean(0) for c in range(C)])
    return np.sum(x * patterns[logits(x, w, b).argmax(1)], axis=1)


def relation(train, x, w, b, power, thres=0.03):
    unit = lambda v: v / np.sqrt((v**2).sum(-1) + 1e-10)[:, None]  # noqa: E731
    ft, fq = unit(train.astype(np.float64)), unit(x.astype(np.float64))
    pt, pq = softmax(logits(train, w, b), axis=1), softmax(logits(x, w, b), axis=1)
    rel = np.clip(fq @ ft.T, 0.0, None) * (pq @ pt.T)
    rel = rel * (np.abs(rel) > thres)
    return np.sum(np.sign(rel) * np.abs(rel) ** power, axis=1)


def held_out(n, fraction):
    """Row i is held out when floor((i + 1) * f) > floor(i * f): floor(n * f) rows, evenly spread."""
    i = np.arange(n)
    return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def temperature(train, y, w, b, fraction):
    rows = held_out(len(train), fraction)
    z, t = logits(train[rows], w, b), y[rows]

    def nll(temp):
        s = z / temp
        return np.mean(logsumexp(s, axis=1) - s[np.arange(len(s)), t])

    r = minimize_scalar(nll, bounds=(1e-2, 1e2), method="bounded", options={"xatol": 1e-12})
    return r.x


def weibull_fit_high(tail):
    """libMR FitHigh on `tail` (fit size = its length): (scale, shape, small_score)."""
    tail = np.sort(np.asarray(tail, dtype=np.float64))[::-1]
    small = tail[-1]
    y = np.log(tail + 1.0 - small)  # translate_amount = 1: every value >= 1, log >= 0
    top, span = y.max(), y.max() - y.min()
    x0 = (y - top) / span  # in [-1, 0]

    def f(sigma):  # the profile likelihood equation of the Gumbel (log-Weibull) scale
        w = np.exp(x0 / sigma)
        return sigma + x0.mean() - np.sum(x0 * w) / np.sum(w)

    sigma = np.sqrt(6.0) * np.std(x0, ddof=1) / np.pi
    lo, hi = sigma, sigma
    while f(lo) > 0:
        lo /= 2
    while f(hi) < 0:
        hi *= 2
    sigma = brentq(f, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    mu = sigma * np.log(np.mean(np.exp(x0 / sigma)))
    mu, sigma = span * mu + top, span * sigma
    return np.exp(mu), 1.0 / sigma, small


def w_score(fit, x):
    scale, shape, small = fit
    t = x + 1.0 - small
    return 0.0 if t < 0 else 1.0 - np.exp(-((t / scale) ** shape))


def openmax_distance(mav, z, kind):
    if kind == "eucos":
        return spd.euclidean(mav, z) * 0.5 + spd.cosine(mav, z)
    return spd.euclidean(mav, z)


def openmax(train, y, x, w, b, tailsize=20, alpha=3, kind="euclidean"):
    """OpenOOD's OpenMax on the logits: MAVs of correctly classified train rows, a Weibull per
    class on the largest distances to its MAV, the top-alpha logits revised; score = -P(unknown)."""
    zt, zq = logits(train, w, b), logits(x, w, b)
    right = zt.argmax(1) == y
    mavs, fits, tails = [], [], np.full((C, tailsize), np.nan)
    for c in range(C):
        rows = zt[right & (y == c)]
        mav = rows.mean(0)
        d = np.array([openmax_distance(mav, r, kind) for r in rows])
        mavs.append(mav)
        tail = np.sort(d)[-tailsize:]
        tails[c, :len(tail)] = tail
        fits.append(weibull_fit_high(tail))
    scores = []
    for z in zq:
        ranked = z.argsort()[::-1][:alpha]
        omega = np.zeros(C)
        omega[ranked] = [(alpha + 1 - i) / alpha for i in range(1, alpha + 1)]
        revised = np.array([z[c] * (1 - w_score(fits[c], openmax_distance(mavs[c], z, kind)) * omega[c])
                            for c in range(C)])
        unknown = np.exp(np.sum(z - revised))
        scores.append(-unknown / (np.sum(np.exp(revised)) + unknown))
    return np.array(scores), np.array(fits), tails


def msp(z):
    return softmax(z, axis=1).max(1)


def main():
    train, y, test, w, b = data()
    pred = logits(train, w, b).argmax(1)
    print(f"train accuracy of the head: {np.mean(pred == y):.3f}")
    cases = {
        "ash-p": ash(test, w, b, 90, "p"),
        "ash-b": ash(test, w, b, 90, "b"),
        "ash-s": ash(test, w, b, 90, "s"),
        "ash-s_65": ash(test, w, b, 65, "s"),
        "scale": ash(test, w, b, 85, "scale"),
        "dice": dice(train, test, w, b, 90),
        "dice_70": dice(train, test, w, b, 70),
        "gen": gen(logits(test, w, b), 0.1, 100),
        "gen_m3": gen(logits(test, w, b), 0.5, 3),
        "fdbd": fdbd(train, test, w, b, True),
        "fdbd_norm": fdbd(train, test, w, b, False),
        "nci": nci(train, test, w, b, 1e-4),
        "nci_01": nci(train, test, w, b, 0.1),
        "nnguide_all": nnguide(train, test, w, b, 10, 1.0),
        "nnguide_half": nnguide(train, test, w, b, 5, 0.5),
        "rmds": rmds(train, y, test),
        "she": she(train, y, test, w, b),
        "relation": relation(train, test, w, b, 1),
        "relation_2": relation(train, test, w, b, 2),
        "t2fnorm": msp(logits(test / np.float32(0.1), w, b)),
        "t2fnorm_5": msp(logits(test / np.float32(5.0), w, b)),
    }
    cases["openmax"], fits, tails = openmax(train, y, test, w, b)
    cases["openmax_eucos"], _, _ = openmax(train, y, test, w, b, kind="eucos")
    cases["openmax_t5_a1"], _, _ = openmax(train, y, test, w, b, tailsize=5, alpha=1)
    cases["openmax_t100_a10"], _, _ = openmax(train, y, test, w, b, tailsize=100, alpha=10)
    print("correctly classified train rows per class:",
          [int(np.sum((logits(train, w, b).argmax(1) == y) & (y == c))) for c in range(C)])
    print("openmax weibull (scale, shape, small):", fits[:2])
    temp = temperature(train, y, w, b, 0.2)
    cases["temp-scaling"] = msp(logits(test, w, b) / temp)
    print(f"temperature: {temp:.6f}")
    os.makedirs(OUT, exist_ok=True)
    np.save(os.path.join(OUT, "posthoc_train.npy"), train)
    np.save(os.path.join(OUT, "posthoc_labels.npy"), y.astype(np.float32))
    np.save(os.path.join(OUT, "posthoc_test.npy"), test)
    np.save(os.path.join(OUT, "posthoc_w.npy"), w)
    np.save(os.path.join(OUT, "posthoc_b.npy"), b)
    np.save(os.path.join(OUT, "posthoc_temperature.npy"), np.array([temp]))
    np.save(os.path.join(OUT, "posthoc_openmax_weibull.npy"), fits.astype(np.float64))
    np.save(os.path.join(OUT, "posthoc_openmax_tails.npy"), tails)
    for name, s in cases.items():
        assert np.all(np.isfinite(s)), name
        np.save(os.path.join(OUT, f"posthoc_expected_{name}.npy"), s.astype(np.float64))
        print(f"{name}: {s[:3]}")


if __name__ == "__main__":
    main()
