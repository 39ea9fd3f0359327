#!/usr/bin/env python3
"""Reference outputs of timm's ResNet for tests/resnet_parity.rs.

Tiny ResNets in timm's own class (timm.models.resnet.ResNet, so the state-dict keys are timm's), with
every parameter and every BatchNorm statistic randomised (so a wrong fold of the running mean or
variance shows), run in float32 eval mode. Written to tests/fixtures/resnet/:
  <name>.safetensors      the state dict (num_batches_tracked included, as timm saves it)
  <name>_input.npy        float32 [B, 3, S, S]
  <name>_features.npy     the pooled penultimate features (forward_head(..., pre_logits=True))
  <name>_logits.npy       logits
Cases: BasicBlock (resnet18/34's block) and Bottleneck (resnet50's) with an ImageNet stem (7x7/2 conv and
3x3/2 max-pool) at 64x64, and the CIFAR stem MODE uses (3x3/1 conv, no max-pool) at 32x32.

Run: python3 tools/make_resnet_fixtures.py   (creates tools/.venv with torch + timm on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "resnet")
CHANNELS = (8, 16, 24, 32)


def tiny(block, layers, cifar):
    m = ResNet(block, layers, num_classes=10, channels=CHANNELS)
    if cifar:
        # MODE's CIFAR ResNet: a 3x3 stride-1 stem and no max-pool, the rest as ImageNet's.
        m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = torch.nn.Identity()
    return m.eval()


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith(".weight") and p.dim() == 1:  # BatchNorm scale
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.2 * r)
            else:
                fan_in = p[0].numel()
                p.copy_(r * (2.0 / fan_in) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    cases = [
        ("tiny_resnet_basic", BasicBlock, (2, 1, 1, 1), False, 64),
        ("tiny_resnet_bottleneck", Bottleneck, (1, 2, 1, 1), False, 64),
        ("tiny_resnet_basic_cifar", BasicBlock, (1, 1, 2, 1), True, 32),
    ]
    for name, block, layers, cifar, size in cases:
        model = tiny(block, layers, cifar)
        randomise(model, gen)
        x = torch.randn((2, 3, size, size), generator=gen)
        with torch.inference_mode():
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
            logits = model(x)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(OUT, f"{name}.safetensors"))
        np.save(os.path.join(OUT, f"{name}_input.npy"), x.numpy().astype(np.float32))
        np.save(os.path.join(OUT, f"{name}_features.npy"), feats.numpy().astype(np.float32))
        np.save(os.path.join(OUT, f"{name}_logits.npy"), logits.numpy().astype(np.float32))
        print(f"{name}: {len(sd)} tensors, features {tuple(feats.shape)}, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
