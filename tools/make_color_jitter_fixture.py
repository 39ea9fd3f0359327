#!/usr/bin/env python3
"""Reference outputs of torchvision's colour transforms for tests/color_jitter.rs.

torchvision.transforms.functional (its tensor implementation, float32 images in [0, 1], as
src/data/color_jitter.rs implements them) applied with fixed factors to a few small random images:
  adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue, rgb_to_grayscale
(num_output_channels = 3, as RandomGrayscale calls it on an RGB image). Nothing is implemented here
by hand: every reference value is torchvision's own output.

Inputs: rgb{i} [3, 6, 7] float32 - rgb0 uniform, rgb1 with grey pixels (r = g = b, where hue and
saturation are undefined), pure 0 and 1 and two-channel maxima, rgb2 quantised to k/255 (ties);
grey0 [1, 6, 7] - a one-channel image, where saturation, hue and grayscale leave it unchanged.
Factors: {op}.factors (float64); outputs {op}.{k}.{image} float32 for factor k.

Written to tests/fixtures/color_jitter/color_jitter.safetensors.
Run: python3 tools/make_color_jitter_fixture.py   (creates tools/.venv with torch on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import torch  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "color_jitter")

FACTORS = {
    # ColorJitter(0.4, 0.4, 0.4, 0.1) draws from [0.6, 1.4] and [-0.1, 0.1]; the edges and beyond too.
    "brightness": [0.0, 0.6, 0.93, 1.0, 1.4, 2.5],
    "contrast": [0.0, 0.6, 1.0, 1.17, 1.4, 3.0],
    "saturation": [0.0, 0.6, 1.0, 1.23, 1.4, 3.0],
    "hue": [-0.5, -0.1, -0.037, 0.0, 0.061, 0.1, 0.5],
}
APPLY = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "saturation": F.adjust_saturation,
    "hue": F.adjust_hue,
}


def images():
    g = torch.Generator().manual_seed(20261204)
    shape = (3, 6, 7)
    rgb0 = torch.rand(shape, generator=g)
    rgb1 = torch.rand(shape, generator=g)
    rgb1[:, 0, :] = rgb1[0, 0, :]  # a grey row
    rgb1[:, 1, 0] = 0.0
    rgb1[:, 1, 1] = 1.0
    rgb1[:, 1, 2] = torch.tensor([1.0, 1.0, 0.2])  # max on r and g
    rgb1[:, 1, 3] = torch.tensor([0.3, 0.7, 0.7])  # max on g and b
    rgb1[:, 1, 4] = torch.tensor([0.9, 0.1, 0.9])  # max on r and b
    rgb1[:, 1, 5] = torch.tensor([1.0, 0.0, 0.0])
    rgb2 = torch.randint(0, 256, shape, generator=g).float() / 255.0
    grey0 = torch.rand((1, 6, 7), generator=g)
    return {"rgb0": rgb0, "rgb1": rgb1, "rgb2": rgb2, "grey0": grey0}


def main():
    os.makedirs(OUT, exist_ok=True)
    ims = images()
    out = {name: t.contiguous() for name, t in ims.items()}
    for op, factors in FACTORS.items():
        out[f"{op}.factors"] = torch.tensor(factors, dtype=torch.float64)
        for k, f in enumerate(factors):
            for name, x in ims.items():
                out[f"{op}.{k}.{name}"] = APPLY[op](x.clone(), f).contiguous()
    for name, x in ims.items():
        c = x.shape[0]
        out[f"grayscale.{name}"] = F.rgb_to_grayscale(x.clone(), num_output_channels=c).contiguous()
    path = os.path.join(OUT, "color_jitter.safetensors")
    save_file(out, path, metadata={"torchvision": torchvision.__version__, "torch": torch.__version__})
    print(f"wrote {path} ({len(out)} tensors, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
