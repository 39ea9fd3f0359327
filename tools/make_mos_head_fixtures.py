#!/usr/bin/env python3
"""Reference for tests/mos_head.rs: MOS's group-softmax head trained by MOS's own recipe in PyTorch.

On a small synthetic feature set (6 classes in 3 groups, given to the groups by a layout file whose
order is not the classes' order), a zero-initialised linear head (MOS's zero_head=True) is trained
full-batch with the loop of MOS's finetune.py: lr from BiT's hyperrule get_lr (warm-up over 100
steps, /10 after 200, 300 and 400, end at 500 for a set under 20 000 images), torch.optim.SGD with
momentum 0.9 and no weight decay, loss = sum over groups of CrossEntropyLoss on the group's slice
(slot 0 = "others"; the per-image targets as DatasetWithMetaGroup builds them). Then the MOS score
of test_mos.py's cal_ood_score (max over groups of minus the "others" probability) on held-out
in-distribution and far-away features. Written to tests/fixtures/mos_head/:
  features.npy [n, d] f32, labels.npy [n] i64, layout.txt (line c: "group index" of class c),
  weight.npy [W, d], bias.npy [W] (the trained head), test.npy [m, d], mos.npy [m] (scores)

Run: python3 tools/make_mos_head_fixtures.py   (creates tools/.venv on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mos_head")
# class -> (group, index within group); groups of 2, 3 and 1 classes
LAYOUT = [(1, 2), (0, 0), (2, 0), (1, 0), (0, 1), (1, 1)]
SIZES = [2, 3, 1]
BASE_LR = 0.05


def schedule(n):
    if n < 20_000:
        return [100, 200, 300, 400, 500]
    if n < 500_000:
        return [500, 3000, 6000, 9000, 10_000]
    return [500, 6000, 12_000, 18_000, 20_000]


def lr_at(step, n, base):
    s = schedule(n)
    if step < s[0]:
        return base * step / s[0]
    if step >= s[-1]:
        return None
    for x in s[1:]:
        if x < step:
            base /= 10
    return base


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    d, per = 8, 20
    centres = 2.0 * torch.randn((len(LAYOUT), d), generator=g)
    x = torch.cat([c + 0.7 * torch.randn((per, d), generator=g) for c in centres])
    y = torch.arange(len(LAYOUT)).repeat_interleave(per)
    n = len(y)
    targets = torch.zeros((n, len(SIZES)), dtype=torch.long)
    for i, c in enumerate(y.tolist()):
        grp, k = LAYOUT[c]
        targets[i, grp] = k + 1
    starts = np.cumsum([0] + [s + 1 for s in SIZES])
    width = int(starts[-1])

    head = torch.nn.Linear(d, width)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=BASE_LR, momentum=0.9)
    ce = torch.nn.CrossEntropyLoss()
    step = 0
    while True:
        lr = lr_at(step, n, BASE_LR)
        if lr is None:
            break
        for group in opt.param_groups:
            group["lr"] = lr
        z = head(x)
        loss = sum(ce(z[:, starts[i]:starts[i + 1]], targets[:, i]) for i in range(len(SIZES)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1

    test = torch.cat([x[::7] + 0.1 * torch.randn((len(x[::7]), d), generator=g),
                      6.0 * torch.randn((10, d), generator=g)])
    with torch.no_grad():
        z = head(test)
        others = torch.stack([torch.softmax(z[:, starts[i]:starts[i + 1]], dim=-1)[:, 0]
                              for i in range(len(SIZES))], dim=1)
        mos = (-others).max(dim=1).values

    np.save(os.path.join(OUT, "features.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "labels.npy"), y.numpy().astype(np.int64))
    with open(os.path.join(OUT, "layout.txt"), "w") as f:
        f.writelines(f"{grp} {k}\n" for grp, k in LAYOUT)
    np.save(os.path.join(OUT, "weight.npy"), head.weight.detach().numpy().astype(np.float32))
    np.save(os.path.join(OUT, "bias.npy"), head.bias.detach().numpy().astype(np.float32))
    np.save(os.path.join(OUT, "test.npy"), test.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "mos.npy"), mos.numpy().astype(np.float32))
    print(f"{step} steps, final loss {loss.item():.5f}, mos ID {mos[:-10].mean():.4f} far {mos[-10:].mean():.4f}")


if __name__ == "__main__":
    main()
