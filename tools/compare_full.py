#!/usr/bin/env python3
"""Full-size parity check (not in CI): a timm model with random weights (relative-position tables,
layer scales and q/v biases randomised too) against `mood forward` on the same weights and input.

    python3 tools/compare_full.py [--arch beit_base_patch16_224] [--batch 2]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="beit_base_patch16_224")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mood", default=os.path.join(ROOT, "target", "release", "mood"))
    a = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(a.arch, pretrained=False).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name or name.endswith("_bias"):
                prm.normal_(0, 0.2)
        # timm scales the head init by 1e-3 (BEiT); a trained head is O(1), so make the logits O(1) too.
        model.get_classifier().weight.normal_(0, 0.05)
    x = torch.randn(a.batch, 3, 224, 224)
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
        logits = model(x).numpy()
    with tempfile.TemporaryDirectory() as d:
        w, xi, f, lg = (os.path.join(d, n) for n in ("w.safetensors", "x.npy", "f.npy", "l.npy"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, w)
        np.save(xi, x.numpy())
        subprocess.run([a.mood, "forward", "--arch", a.arch, "--weights", w, "--input", xi, "--features", f,
                        "--logits", lg], check=True)
        ef = np.abs(np.load(f) - feats).max()
        el = np.abs(np.load(lg) - logits).max()
    print(f"{a.arch}, batch {a.batch}, random weights: max |mood - timm| features {ef:.3e} "
          f"(|features| max {np.abs(feats).max():.2f}), logits {el:.3e} (|logits| max {np.abs(logits).max():.2f})")


if __name__ == "__main__":
    main()
