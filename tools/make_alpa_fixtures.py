#!/usr/bin/env python3
"""PyTorch reference for MODE's ALPA loss (SPEC E) for tests/alpa.rs:

Local features F [M, T, D] of M views; query/key/value MLPs Linear(D->D, no bias) -> ReLU ->
Linear(D->d, no bias); for every pair (a, b): A~ = softmax(Q_b K_a^T / sqrt d) V_a,
B~ = softmax(Q_a K_b^T / sqrt d) V_b, s(a, b) = mean_p [cos(V_a[p], B~[p]) + cos(V_b[p], A~[p])];
logits = 10 s with self-pairs masked; loss = -mean_i (sum over positives j of log-softmax_ij) / max(1, |P(i)|).
Written from SPEC.md's description with plain torch ops and autograd. Saves, under tests/fixtures/train/:
alpa_{features,labels,loss,sim}.npy and alpa_{weights,grads}.safetensors (grads include `features`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "train")
NAMES = ["query.0", "query.2", "key.0", "key.2", "value.0", "value.2"]


def similarity(f, w, d):
    def mlp(a, b):
        return torch.relu(f @ w[a].T) @ w[b].T
    q, k, v = mlp("query.0", "query.2"), mlp("key.0", "key.2"), mlp("value.0", "value.2")
    m = f.shape[0]
    rows = []
    for a in range(m):
        row = []
        for b in range(m):
            at = torch.softmax(q[b] @ k[a].T / d ** 0.5, -1) @ v[a]
            bt = torch.softmax(q[a] @ k[b].T / d ** 0.5, -1) @ v[b]
            cos = torch.nn.functional.cosine_similarity
            row.append((cos(v[a], bt, dim=-1) + cos(v[b], at, dim=-1)).mean())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def contrastive(s, labels, temperature=10.0):
    logits = temperature * s
    m = len(labels)
    eye = torch.eye(m, dtype=torch.bool)
    logits = logits - logits.max(1, keepdim=True).values.detach()
    denom = torch.log((torch.exp(logits) * (~eye)).sum(1, keepdim=True))
    log_prob = logits - denom
    pos = (labels[:, None] == labels[None, :]) & ~eye
    per = (pos * log_prob).sum(1) / pos.sum(1).clamp(min=1)
    return -per.mean()


def main():
    g = torch.Generator().manual_seed(11)
    m, t, dim, d = 6, 4, 8, 5
    # Inputs rounded to float32 first, so the f32 fixtures are exactly what the reference saw.
    f = torch.randn(m, t, dim, generator=g).double().requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # label 3 has no positive: its term is 0
    w = {n: (torch.randn(d if n.endswith(".2") else dim, dim, generator=g) / dim ** 0.5).double()
         .requires_grad_(True) for n in NAMES}
    s = similarity(f, w, d)
    loss = contrastive(s, labels)
    loss.backward()
    np.save(os.path.join(OUT, "alpa_features.npy"), f.detach().numpy().astype(np.float32))
    np.save(os.path.join(OUT, "alpa_labels.npy"), labels.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "alpa_loss.npy"), np.array([loss.item()]))
    np.save(os.path.join(OUT, "alpa_sim.npy"), s.detach().numpy())
    save_file({n: v.detach().float().contiguous() for n, v in w.items()}, os.path.join(OUT, "alpa_weights.safetensors"))
    grads = {n: v.grad.float().contiguous() for n, v in w.items()}
    grads["features"] = f.grad.float().contiguous()
    save_file(grads, os.path.join(OUT, "alpa_grads.safetensors"))
    print(f"ALPA loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
