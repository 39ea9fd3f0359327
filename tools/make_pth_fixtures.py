#!/usr/bin/env python3
"""PyTorch checkpoints for tests/pth_reader.rs, each beside its expected tensors as safetensors
(written by the `safetensors` package, so the reader is checked against an independent writer):

  plain.pth            f32, f16, bf16, i64, bool tensors at the top level
  nested_model.pth     {"model": state_dict, "epoch": 3, "args": argparse.Namespace(...)}
  nested_module.pth    {"module": {"module.x": ...}} as DeepSpeed writes
  views.pth            non-contiguous tensors: a transpose, a strided slice, and two views of one storage
  legacy.pth           the pre-1.6 non-zip format (must be refused with a clear message)
  scripted.pt          a TorchScript archive (must be refused with a clear message)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "pth")


def expect(name, tensors):
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.expected.safetensors"))


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    plain = {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(4, 2, generator=g).half(),
        "wbf16": torch.randn(7, generator=g).bfloat16(),
        "index": torch.arange(12).reshape(3, 4),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }
    torch.save(plain, os.path.join(OUT, "plain.pth"))
    expect("plain", plain)

    sd = {"blocks.0.norm1.weight": torch.randn(6, generator=g), "head.weight": torch.randn(2, 6, generator=g)}
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=2e-5, model="beit_large_patch16_224"),
                "scaler": {"scale": 65536.0}}, os.path.join(OUT, "nested_model.pth"))
    expect("nested_model", sd)

    msd = {"module.cls_token": torch.randn(1, 1, 4, generator=g), "module.head.bias": torch.randn(3, generator=g)}
    torch.save({"module": msd}, os.path.join(OUT, "nested_module.pth"))
    expect("nested_module", msd)

    base = torch.randn(6, 8, generator=g)
    views = {"transposed": base.t(), "strided": base[1::2, ::3], "row": base[2], "whole": base}
    torch.save(views, os.path.join(OUT, "views.pth"))
    expect("views", views)

    torch.save({"w": torch.randn(2, 2, generator=g)}, os.path.join(OUT, "legacy.pth"),
               _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), os.path.join(OUT, "scripted.pt"))
    print("written:", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
