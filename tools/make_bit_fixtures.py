#!/usr/bin/env python3
"""Reference outputs of timm's BiT ResNet-v2 for tests/bit_parity.rs.

A tiny model in timm's own class and BiT settings (timm.models.resnetv2.ResNetV2 with
stem_type='fixed' and StdConv2d(eps=1e-8), as timm's resnetv2_*_bit factories build it; 4 groups per
GroupNorm instead of 32 so the channels can stay few), every parameter randomised: each GroupNorm's
scale and shift, the convolution kernels with a per-output-channel offset (so that a missing weight
standardisation shows), the head. Run in float32 eval mode. Written to tests/fixtures/bit/:

  tiny_bit.safetensors        timm's state dict
  tiny_bit.npz                the same weights under Google's BiT .npz names (`resnet/...`, kernels
                              HWIO), as timm's and big_transfer's npz loaders read them
  tiny_bit-group-finetune.pth.tar
                              the same weights as MOS's fine-tuning script saves them: torch.save of
                              {"step", "model": DataParallel state dict (`module.` + big_transfer's
                              PyTorch names: root.conv, body.blockN.unitMM.{gn1,conv1,...,downsample},
                              before_head.gn, head.conv), "optim": an SGD state dict}
  tiny_bit_input.npy          float32 [B, 3, S, S]
  tiny_bit_features.npy       pooled pre-logits features (forward_head(..., pre_logits=True))
  tiny_bit_logits.npy         logits

Run: python3 tools/make_bit_fixtures.py   (creates tools/.venv with torch + timm on first use)
"""
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.layers import GroupNormAct, StdConv2d  # noqa: E402
from timm.models.resnetv2 import ResNetV2  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bit")
# Must agree with BitConfig::preset("test_tiny_bit") in src/model/bit.rs.
LAYERS = (1, 2, 1, 1)
CHANNELS = (16, 32, 32, 64)  # the first stage's bottleneck width rounds up to 8 (timm's make_divisible)
STEM = 8
GROUPS = 4
CLASSES = 10
SIZE = 48


def tiny():
    m = ResNetV2(
        layers=list(LAYERS),
        channels=CHANNELS,
        num_classes=CLASSES,
        stem_chs=STEM,
        stem_type="fixed",
        conv_layer=partial(StdConv2d, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=GROUPS),
    )
    return m.eval()


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith(".weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.2 * r)
            elif name.startswith("head."):
                p.copy_(r * (1.0 / p[0].numel()) ** 0.5)
            else:  # a standardised kernel: scale and per-channel offset are removed by the model
                offset = torch.randn((p.shape[0], 1, 1, 1), generator=gen)
                p.copy_(0.7 * r + offset)


def hwio(t):
    return t.permute(2, 3, 1, 0).contiguous().numpy()


def google_npz(sd):
    """timm's names -> Google's BiT .npz names (the inverse of timm's _load_weights)."""
    out = {
        "resnet/root_block/standardized_conv2d/kernel": hwio(sd["stem.conv.weight"]),
        "resnet/group_norm/gamma": sd["norm.weight"].numpy(),
        "resnet/group_norm/beta": sd["norm.bias"].numpy(),
        "resnet/head/conv2d/kernel": hwio(sd["head.fc.weight"]),
        "resnet/head/conv2d/bias": sd["head.fc.bias"].numpy(),
    }
    for s, n in enumerate(LAYERS):
        for b in range(n):
            t = f"stages.{s}.blocks.{b}."
            g = f"resnet/block{s + 1}/unit{b + 1:02d}/"
            for i, u in enumerate("abc"):
                out[f"{g}{u}/standardized_conv2d/kernel"] = hwio(sd[f"{t}conv{i + 1}.weight"])
                out[f"{g}{u}/group_norm/gamma"] = sd[f"{t}norm{i + 1}.weight"].numpy()
                out[f"{g}{u}/group_norm/beta"] = sd[f"{t}norm{i + 1}.bias"].numpy()
            if f"{t}downsample.conv.weight" in sd:
                out[f"{g}a/proj/standardized_conv2d/kernel"] = hwio(sd[f"{t}downsample.conv.weight"])
    return out


def big_transfer_names(sd):
    """timm's names -> big_transfer's PyTorch names (the model MOS fine-tunes)."""
    out = {
        "root.conv.weight": sd["stem.conv.weight"],
        "before_head.gn.weight": sd["norm.weight"],
        "before_head.gn.bias": sd["norm.bias"],
        "head.conv.weight": sd["head.fc.weight"],
        "head.conv.bias": sd["head.fc.bias"],
    }
    for s, n in enumerate(LAYERS):
        for b in range(n):
            t = f"stages.{s}.blocks.{b}."
            g = f"body.block{s + 1}.unit{b + 1:02d}."
            for i in (1, 2, 3):
                out[f"{g}conv{i}.weight"] = sd[f"{t}conv{i}.weight"]
                out[f"{g}gn{i}.weight"] = sd[f"{t}norm{i}.weight"]
                out[f"{g}gn{i}.bias"] = sd[f"{t}norm{i}.bias"]
            if f"{t}downsample.conv.weight" in sd:
                out[f"{g}downsample.weight"] = sd[f"{t}downsample.conv.weight"]
    assert len(out) == len(sd), "every tensor renamed once"
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    model = tiny()
    randomise(model, gen)
    x = torch.randn((2, 3, SIZE, SIZE), generator=gen)
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(OUT, "tiny_bit.safetensors"))
    np.savez(os.path.join(OUT, "tiny_bit.npz"), **google_npz(sd))

    # MOS's layout: the model wrapped in DataParallel (hence `module.`), SGD with momentum on the
    # head only (the frozen-backbone setting keeps the fixture small), one step taken.
    bt = {f"module.{k}": v.clone() for k, v in big_transfer_names(sd).items()}
    head = [torch.nn.Parameter(bt["module.head.conv.weight"].clone()),
            torch.nn.Parameter(bt["module.head.conv.bias"].clone())]
    optim = torch.optim.SGD(head, lr=0.003, momentum=0.9)
    sum(p.sum() for p in head).backward()
    optim.step()
    torch.save({"step": 1, "model": bt, "optim": optim.state_dict()},
               os.path.join(OUT, "tiny_bit-group-finetune.pth.tar"))

    np.save(os.path.join(OUT, "tiny_bit_input.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "tiny_bit_features.npy"), feats.numpy().astype(np.float32))
    np.save(os.path.join(OUT, "tiny_bit_logits.npy"), logits.numpy().astype(np.float32))
    print(f"tiny_bit: {len(sd)} tensors, features {tuple(feats.shape)}, logits {tuple(logits.shape)}")
    for k, v in list(sd.items())[:3]:
        print(f"  {k} {tuple(v.shape)}")


if __name__ == "__main__":
    main()
