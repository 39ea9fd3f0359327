#!/usr/bin/env python3
"""Reference outputs of torchvision's PIL-backed evaluation transforms for tests/preprocess_parity.rs.

Inputs are the two bundled photographs (data/china.jpg, data/flower.jpg) and variants made here with
Pillow into tests/fixtures/preprocess/: a resized JPEG of odd size, a greyscale JPEG, an RGB PNG, an
RGBA PNG and a CMYK JPEG. For every input and preset this writes the expected CHW float32 tensor as
.npy, and PIL's decoded RGB pixels as a lossless PNG (smaller than an .npy of the same pixels), so
the test can check the resize on PIL's own pixels apart from JPEG decoder differences.

The transforms are written here from torchvision's documentation, not from the Rust presets:
  mood      Resize(int(S/0.875), BICUBIC), CenterCrop(S), ToTensor, Normalize(0.5, 0.5)
  moodv2    Resize((S, S), BILINEAR), ToTensor, Normalize(0.5, 0.5)
  imagenet  Resize(int(S/0.875), BICUBIC), CenterCrop(S), ToTensor, Normalize(ImageNet)
  cifar     Resize((S, S), BILINEAR), CenterCrop(S), ToTensor, Normalize(CIFAR, as MODE)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "preprocess")
BIC = T.InterpolationMode.BICUBIC
BIL = T.InterpolationMode.BILINEAR


def transform(preset, s):
    half = ([0.5] * 3, [0.5] * 3)
    if preset == "mood":
        steps, norm = [T.Resize(int(s / 0.875), interpolation=BIC), T.CenterCrop(s)], half
    elif preset == "moodv2":
        steps, norm = [T.Resize((s, s), interpolation=BIL)], half
    elif preset == "imagenet":
        steps, norm = [T.Resize(int(s / 0.875), interpolation=BIC), T.CenterCrop(s)], \
            ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    elif preset == "cifar":
        steps, norm = [T.Resize((s, s), interpolation=BIL), T.CenterCrop(s)], \
            ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    else:
        raise ValueError(preset)
    return T.Compose(steps + [T.ToTensor(), T.Normalize(*norm)])


def pil_loader(path):
    # torchvision.datasets.folder.pil_loader
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def make_inputs():
    china = Image.open(os.path.join(ROOT, "data", "china.jpg")).convert("RGB")
    flower = Image.open(os.path.join(ROOT, "data", "flower.jpg")).convert("RGB")
    made = {}
    # An odd size whose resize is not a round factor, wider than tall, 4:2:0 chroma.
    p = os.path.join(OUT, "china_odd.jpg")
    china.resize((251, 167), Image.BICUBIC).save(p, quality=90)
    made["china_odd"] = p
    # Taller than wide, greyscale JPEG (one component).
    p = os.path.join(OUT, "flower_grey.jpg")
    flower.crop((200, 0, 420, 300)).convert("L").resize((110, 150), Image.BILINEAR).save(p, quality=92)
    made["flower_grey"] = p
    p = os.path.join(OUT, "flower.png")
    flower.resize((97, 73), Image.LANCZOS).save(p)
    made["flower_png"] = p
    # Alpha is dropped (not composited) by convert('RGB').
    rgba = flower.resize((64, 80), Image.BILINEAR).convert("RGBA")
    a = np.array(rgba)
    a[..., 3] = np.linspace(0, 255, a.shape[1], dtype=np.uint8)[None, :]
    p = os.path.join(OUT, "flower_rgba.png")
    Image.fromarray(a, "RGBA").save(p)
    made["flower_rgba"] = p
    p = os.path.join(OUT, "china_cmyk.jpg")
    china.resize((120, 90), Image.BICUBIC).convert("CMYK").save(p, quality=90)
    made["china_cmyk"] = p
    return made


def main():
    os.makedirs(OUT, exist_ok=True)
    inputs = {"china": os.path.join(ROOT, "data", "china.jpg"),
              "flower": os.path.join(ROOT, "data", "flower.jpg")}
    inputs.update(make_inputs())
    cases = []
    for name, path in inputs.items():
        img = pil_loader(path)
        assert img.mode == "RGB"
        pil_png = f"{name}.pil.png"
        img.save(os.path.join(OUT, pil_png))
        sizes = {"mood": [56], "moodv2": [56], "imagenet": [56], "cifar": [32]}
        if name == "china":
            sizes["mood"].append(224)
        for preset, ss in sizes.items():
            for s in ss:
                x = transform(preset, s)(img).numpy().astype(np.float32)
                exp = f"{name}.{preset}{s}.npy"
                np.save(os.path.join(OUT, exp), x)
                cases.append({"name": f"{name}/{preset}{s}", "image": os.path.relpath(path, ROOT),
                              "pil_png": f"preprocess/{pil_png}", "preset": preset, "img_size": s,
                              "expected": f"preprocess/{exp}", "shape": list(x.shape)})
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"{len(cases)} cases, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
