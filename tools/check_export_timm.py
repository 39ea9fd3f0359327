#!/usr/bin/env python3
"""`mood export` against timm: a `mood finetune` checkpoint, exported, loaded by timm with strict=True,
and timm's logits compared with mood's on the same inputs.

Steps (each one a subprocess of the mood binary, or timm in this interpreter):
  1. `mood finetune` of the tiny BEiT (test_tiny_beit) on the digits, starting from the randomised
     timm fixture tests/fixtures/timm/tiny_beit.safetensors so that the relative-position tables,
     q/v biases and layer scales are far from their initial values (skipped with --checkpoint);
  2. `mood export CKPT -o EXPORT`;
  3. timm's Beit of that architecture, `load_state_dict(load_file(EXPORT), strict=True)`, eval mode,
     float32, on fixed random inputs;
  4. `mood forward` of EXPORT on the same inputs; the largest logit difference must be below 1e-4.

Writes to tests/fixtures/export/ (what tests/export_timm.rs reads):
  tiny_beit_finetune.safetensors   the checkpoint (parameters + AdamW moments + mood_progress)
  tiny_beit_export.safetensors     what `mood export` wrote, the file timm loaded
  input.npy                        float32 [4, 3, 32, 32]
  timm_logits.npy                  timm's logits on input.npy
  timm_state_dict.json             timm's state_dict() names and shapes for this architecture

Run: cargo build --release && python3 tools/check_export_timm.py
     (creates tools/.venv with torch + timm on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from timm.models.beit import Beit  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "export")
ARCH = "test_tiny_beit"
TOLERANCE = 1e-4

# mood's test presets (src/model/config.rs) that timm has no name for, as timm constructors.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4)
BY_HAND = {
    "test_tiny_beit": lambda c: Beit(**TINY, num_classes=c, use_abs_pos_emb=False, use_rel_pos_bias=True,
                                     init_values=0.1),
    "test_tiny_beit_shared_relpos": lambda c: Beit(**TINY, num_classes=c, use_abs_pos_emb=False,
                                                   use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                   init_values=0.1),
    "test_tiny_vit": lambda c: VisionTransformer(**TINY, num_classes=c),
    "beit_tiny_patch8_32": lambda c: Beit(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                                          mlp_ratio=4, num_classes=c, use_abs_pos_emb=True,
                                          use_rel_pos_bias=True, init_values=0.1),
}


def mood(binary, *args):
    cmd = [binary, *args]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def timm_model(arch, num_classes):
    if arch in BY_HAND:
        return BY_HAND[arch](num_classes)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mood", default=os.path.join(ROOT, "target", "release", "mood"),
                    help="the mood binary (default: target/release/mood)")
    ap.add_argument("--checkpoint", help="export this checkpoint instead of fine-tuning one")
    ap.add_argument("--out", default=OUT, help="fixture folder (default: tests/fixtures/export)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    ckpt = args.checkpoint or os.path.join(args.out, "tiny_beit_finetune.safetensors")
    if not args.checkpoint:
        start = os.path.join(ROOT, "tests", "fixtures", "timm", "tiny_beit.safetensors")
        mood(args.mood, "finetune", "--arch", ARCH, "--weights", start, "--data", "digits:0-4",
             "--epochs", "2", "--batch", "32", "--lr", "2e-3", "--seed", "5", "--threads", "1",
             "-o", ckpt, "--overwrite")
    export = os.path.join(args.out, "tiny_beit_export.safetensors")
    mood(args.mood, "export", ckpt, "-o", export, "--overwrite")

    with safe_open(export, "pt") as f:
        meta = f.metadata()
    source = json.loads(meta["mood_export"])
    arch, classes = source["arch"], source["num_classes"] or 0
    model = timm_model(arch, classes).eval()
    model.load_state_dict(load_file(export), strict=True)
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(args.out, "timm_state_dict.json"), "w") as f:
        json.dump({"arch": arch, "timm": timm.__version__, "tensors": state}, f, indent=1, sort_keys=True)
        f.write("\n")

    gen = torch.Generator().manual_seed(20261203)
    x = torch.randn(4, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1], generator=gen)
    with torch.inference_mode():
        timm_logits = model(x).numpy().astype(np.float32)
    input_path = os.path.join(args.out, "input.npy")
    np.save(input_path, x.numpy().astype(np.float32))
    np.save(os.path.join(args.out, "timm_logits.npy"), timm_logits)

    with tempfile.TemporaryDirectory() as tmp:
        feats, logits = os.path.join(tmp, "features.npy"), os.path.join(tmp, "logits.npy")
        mood(args.mood, "forward", "--arch", arch, "--weights", export, "--input", input_path,
             "--features", feats, "--logits", logits)
        mood_logits = np.load(logits)
    diff = float(np.abs(mood_logits - timm_logits).max())
    print(f"{arch}: {len(state)} tensors loaded by timm {timm.__version__} with strict=True; "
          f"logits {timm_logits.shape}, |max| {np.abs(timm_logits).max():.4f}, "
          f"largest |timm - mood| {diff:.3g} (tolerance {TOLERANCE:g})")
    if not diff <= TOLERANCE:
        sys.exit(f"mood's logits differ from timm's by {diff:.3g} > {TOLERANCE:g}")


if __name__ == "__main__":
    main()
