#!/usr/bin/env python3
"""Reference ODIN input gradients and scores of timm's ResNet for tests/resnet_odin.rs.

The tiny ResNets of tools/make_resnet_fixtures.py (tests/fixtures/resnet/<name>.safetensors and
<name>_input.npy), in eval mode and float64: L = sum_b CE(z_b / T, argmax z_b), g = dL/dx,
x' = x - eps * sign(g) (sign 0 counted as +), score = max softmax(z(x') / T). Written to
tests/fixtures/resnet_train/odin.safetensors as {name}.grad [B, 3, S, S] and
{name}.scores_T{T} [B] for (T, eps) in ((1000, 0.0014), (1, 0.01)).

Run: python3 tools/make_resnet_odin_fixtures.py   (creates tools/.venv with torch + timm on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CASES = [  # the cases of make_resnet_fixtures.py
    ("tiny_resnet_basic", BasicBlock, (2, 1, 1, 1), False),
    ("tiny_resnet_bottleneck", Bottleneck, (1, 2, 1, 1), False),
    ("tiny_resnet_basic_cifar", BasicBlock, (1, 1, 2, 1), True),
]


def main():
    out = {}
    for name, block, layers, cifar in CASES:
        m = ResNet(block, layers, num_classes=10, channels=(8, 16, 24, 32))
        if cifar:
            m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            m.maxpool = torch.nn.Identity()
        m.load_state_dict(load_file(os.path.join(ROOT, "resnet", f"{name}.safetensors")))
        m = m.double().eval()
        x0 = torch.from_numpy(np.load(os.path.join(ROOT, "resnet", f"{name}_input.npy"))).double()
        for t, eps in ((1000.0, 0.0014), (1.0, 0.01)):
            x = x0.clone().requires_grad_()
            z = m(x)
            loss = F.cross_entropy(z / t, z.argmax(1), reduction="sum")
            loss.backward()
            g = x.grad
            x2 = x0 - eps * torch.where(g >= 0, 1.0, -1.0)
            with torch.no_grad():
                s = F.softmax(m(x2) / t, dim=1).max(1).values
            out[f"{name}.grad_T{int(t)}"] = g.float().contiguous()
            out[f"{name}.scores_T{int(t)}"] = s.float().contiguous()
    path = os.path.join(ROOT, "resnet_train", "odin.safetensors")
    save_file(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"wrote {len(out)} tensors to {path}")


if __name__ == "__main__":
    main()
