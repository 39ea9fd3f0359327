#!/usr/bin/env python3
"""Reference gradients of a ResNet in training mode and of MODE's SupCon loss, for
tests/resnet_train.rs, from torch autograd in float64.

Two tiny ResNets in timm's own class (timm.models.resnet.ResNet, so the names are timm's) in train()
mode (BatchNorm on batch statistics, running statistics updated with momentum 0.1):
  basic_cifar   BasicBlock, layers (2, 2, 2, 2) as resnet18, the CIFAR stem MODE uses (3x3/1 conv,
                no max-pool), stem width 64 (timm's), channels (4, 8, 8, 16), 16x16 images, batch 4
  bottleneck    Bottleneck, layers (1, 1, 1, 1), ImageNet stem (7x7/2 conv, 3x3/2 max-pool), stem
                width 64, channels (4, 4, 8, 8), 32x32 images, batch 3
Every parameter and running statistic is randomised. The loss is L = sum(map * r_map) +
sum(mean_hw(map) * r_feat) with random r_map, r_feat, so both ways a gradient enters the network
(ALPA's local tokens, SupCon's pooled features) are exercised. Stored per case (float32, NCHW):
  {case}.cfg            [bottleneck?, cifar_stem?, stem_width, layers x4, channels x4, size]
  {case}.input, {case}.r_map, {case}.r_feat, {case}.map, {case}.dinput
  {case}.p.{name}       parameters and running statistics before the step
  {case}.g.{name}       dL/d every parameter (conv weights, BatchNorm weight and bias)
  {case}.run.{name}     running statistics after the forward
And MODE's SupCon (temperature 0.1, base 0.07, 'all' contrast mode) through the projection head
Linear(F, F) -> ReLU -> Linear(F, P) -> L2-normalise, on view-major features of 2 views of 6 images:
  supcon.features [12, 16], supcon.labels [12], supcon.head.{0,2}.{weight,bias}, supcon.loss [1],
  supcon.d_features, supcon.d_head.{0,2}.{weight,bias}

Run: python3 tools/make_resnet_train_fixtures.py   (creates tools/.venv with torch + timm on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "resnet_train")
CASES = [  # (name, block, layers, channels, stem width, cifar stem, size, batch)
    ("basic_cifar", BasicBlock, (2, 2, 2, 2), (4, 8, 8, 16), 64, True, 16, 4),
    ("bottleneck", Bottleneck, (1, 1, 1, 1), (4, 4, 8, 8), 64, False, 32, 3),
]


def build(block, layers, channels, stem_width, cifar, gen):
    m = ResNet(block, layers, num_classes=0, channels=channels)  # timm's plain stem is 64 wide
    if cifar:
        m.conv1 = torch.nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = torch.nn.Identity()
    m = m.double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.dim() == 1 and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * r)
            elif p.dim() == 1:
                p.copy_(0.2 * r)
            else:
                p.copy_(r * (2.0 / p[0].numel()) ** 0.5)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=torch.float64))
    return m.train()


def supcon(z, labels, t=0.1, base=0.07):
    """SupCon over view-major rows z [M, P] (already normalised), from its definition."""
    m = z.shape[0]
    logits = z @ z.T / t
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(m, dtype=torch.bool)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    exp = torch.exp(logits).masked_fill(self_mask, 0.0)
    log_prob = logits - torch.log(exp.sum(1, keepdim=True))
    mean_pos = (log_prob * pos).sum(1) / pos.sum(1)
    return (-(t / base) * mean_pos).mean()


def main():
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    out = {}

    def put(name, t):
        out[name] = t.detach().to(torch.float32).contiguous()

    for name, block, layers, channels, stem, cifar, size, batch in CASES:
        m = build(block, layers, channels, stem, cifar, gen)
        for k, v in m.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                put(f"{name}.p.{k}", v)
        x = rnd(batch, 3, size, size).requires_grad_()
        fmap = m.forward_features(x)
        r_map, r_feat = rnd(*fmap.shape), rnd(fmap.shape[0], fmap.shape[1])
        loss = (fmap * r_map).sum() + (fmap.mean((2, 3)) * r_feat).sum()
        loss.backward()
        for k, p in m.named_parameters():
            put(f"{name}.g.{k}", p.grad)
        for k, b in m.named_buffers():
            if k.endswith("running_mean") or k.endswith("running_var"):
                put(f"{name}.run.{k}", b)
        cfg = [float(block is Bottleneck), float(cifar), stem, *layers, *channels, size]
        put(f"{name}.cfg", torch.tensor(cfg, dtype=torch.float64))
        put(f"{name}.input", x)
        put(f"{name}.r_map", r_map)
        put(f"{name}.r_feat", r_feat)
        put(f"{name}.map", fmap)
        put(f"{name}.dinput", x.grad)

    f, p, b = 16, 8, 6
    feats = rnd(2 * b, f).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1, 1], dtype=torch.long).repeat(2)
    l0, l2 = torch.nn.Linear(f, f).double(), torch.nn.Linear(f, p).double()
    with torch.no_grad():
        for lin in (l0, l2):
            lin.weight.copy_(rnd(*lin.weight.shape) * 0.4)
            lin.bias.copy_(rnd(*lin.bias.shape) * 0.1)
    z = F.normalize(l2(F.relu(l0(feats))), dim=1)
    loss = supcon(z, labels)
    loss.backward()
    put("supcon.features", feats)
    put("supcon.labels", labels.double())
    put("supcon.loss", loss.reshape(1))
    put("supcon.d_features", feats.grad)
    for i, lin in ((0, l0), (2, l2)):
        put(f"supcon.head.{i}.weight", lin.weight)
        put(f"supcon.head.{i}.bias", lin.bias)
        put(f"supcon.d_head.{i}.weight", lin.weight.grad)
        put(f"supcon.d_head.{i}.bias", lin.bias.grad)

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "resnet_train.safetensors")
    save_file(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"wrote {len(out)} tensors to {path}")


if __name__ == "__main__":
    main()
