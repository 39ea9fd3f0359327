#!/usr/bin/env python3
"""An ImageNet-shaped image folder for the decode benchmark: N JPEGs of 500x375 (ImageNet's most
common size), 4:2:0 chroma, quality 90, in 10 class sub-folders, cut from the two bundled
photographs (random crops of 60-100% of the side, random flips, a small brightness change), seeded.

    python3 tools/make_imagenet_like.py [--out /tmp/mood-imagenet-like] [--count 2000] [--seed 0]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/mood-imagenet-like")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="500x375", help="WxH of every image")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    rng = np.random.default_rng(a.seed)
    photos = [Image.open(os.path.join(ROOT, "data", n)).convert("RGB") for n in ("china.jpg", "flower.jpg")]
    for c in range(10):
        os.makedirs(os.path.join(a.out, f"class{c:02d}"), exist_ok=True)
    for i in range(a.count):
        src = photos[i % 2]
        frac = rng.uniform(0.6, 1.0)
        cw = int(src.width * frac)
        ch = min(int(cw * h / w), src.height)
        x0 = int(rng.integers(0, src.width - cw + 1))
        y0 = int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
        img.save(os.path.join(a.out, f"class{i % 10:02d}", f"img{i:05d}.jpg"), quality=90, subsampling="4:2:0")
    print(f"{a.count} JPEGs of {w}x{h} in {a.out}")


if __name__ == "__main__":
    main()
