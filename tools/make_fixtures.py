#!/usr/bin/env python3
"""Reference outputs of timm for the parity tests (tests/timm_parity.rs).

Builds tiny timm models with every parameter randomised (so the relative-position tables, q/v biases,
layer scales and norms all matter), runs them in float32 eval mode, and writes to tests/fixtures/timm/:
  <name>.safetensors          the state dict (timm's own key names)
  <name>_input.npy            float32 [B, 3, 32, 32]
  <name>_features.npy         pre-logits features (forward_head(..., pre_logits=True))
  <name>_logits.npy           logits
plus tiny_beit.pth (the BEiT state dict nested under "model", with extra non-tensor entries, as
official BEiT / MOOD checkpoints are) and tiny_beit_f16.safetensors with its own reference outputs
(weights rounded to float16, the model run in float32 on the rounded values).

Run: python3 tools/make_fixtures.py   (creates tools/.venv with torch + timm on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models.beit import Beit  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "timm")
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4, num_classes=10)


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm.weight" in name:
                p.copy_(1.0 + 0.2 * r)
            elif "relative_position_bias_table" in name:
                p.copy_(0.5 * r)
            elif "gamma" in name:
                p.copy_(0.5 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(0.15 * r)


def run(model, x):
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    return feats.numpy().astype(np.float32), logits.numpy().astype(np.float32)


def save(name, model, x):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(OUT, f"{name}.safetensors"))
    feats, logits = run(model, x)
    np.save(os.path.join(OUT, f"{name}_input.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(OUT, f"{name}_features.npy"), feats)
    np.save(os.path.join(OUT, f"{name}_logits.npy"), logits)
    print(f"{name}: {len(sd)} tensors, features {feats.shape} |max| {np.abs(feats).max():.3f}, "
          f"logits {logits.shape} |max| {np.abs(logits).max():.3f}")
    return sd


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(20261122)
    x = torch.randn(4, 3, 32, 32, generator=gen)

    beit = Beit(**TINY, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1).eval()
    randomise(beit, gen)
    assert abs(beit.fc_norm.eps - 1e-6) < 1e-12
    sd = save("tiny_beit", beit, x)
    torch.save({"model": sd, "epoch": 7, "args": argparse.Namespace(lr=2e-5, model="beit")},
               os.path.join(OUT, "tiny_beit.pth"))

    shared = Beit(**TINY, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                  init_values=0.1).eval()
    randomise(shared, gen)
    save("tiny_beit_shared_relpos", shared, x)

    vit = VisionTransformer(**TINY).eval()
    randomise(vit, gen)
    assert abs(vit.norm.eps - 1e-6) < 1e-12
    save("tiny_vit", vit, x)

    # float16 weights: round, run the float32 model on the rounded values, store the halves.
    with torch.no_grad():
        for p in beit.parameters():
            p.copy_(p.half().float())
    sd16 = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in beit.state_dict().items()}
    save_file(sd16, os.path.join(OUT, "tiny_beit_f16.safetensors"))
    feats, logits = run(beit, x)
    np.save(os.path.join(OUT, "tiny_beit_f16_features.npy"), feats)
    np.save(os.path.join(OUT, "tiny_beit_f16_logits.npy"), logits)
    print("tiny_beit_f16 written")


if __name__ == "__main__":
    main()
