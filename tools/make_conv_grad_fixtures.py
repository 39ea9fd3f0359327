#!/usr/bin/env python3
"""Reference gradients of the convolutional ops for tests/conv_grad.rs, from torch autograd.

Each case runs the op in float64 on random inputs (so the reference carries no float32 rounding),
back-propagates a random upstream gradient dy, and stores inputs, outputs and gradients in float32,
NCHW as torch holds them (the test permutes to mood's NHWC). Written to
tests/fixtures/conv_grad/conv_grad.safetensors:
  conv{i}.{x,w,b,dy,dx,dw,db,geom}   F.conv2d with bias; geom = [cin, cout, k, stride, pad]
  bn.{x,gamma,beta,rm,rv,dy,y,rm_new,rv_new,dx,dgamma,dbeta,geom}
                                     F.batch_norm(training=True, momentum=0.1, eps=1e-5); geom = [momentum, eps]
  pool{i}.{x,dy,y,dx,geom}           F.max_pool2d; geom = [k, stride, pad]; pool1 has ties (integer-valued x)
  mean.{x,dy,dx}                     x.mean((2, 3))
Cases cover the stem (7x7/2), 3x3 with stride 1 and 2 (overlapping windows), a pointwise 1x1 and the
1x1/2 downsample of a residual block.

Run: python3 tools/make_conv_grad_fixtures.py   (creates tools/.venv with torch on first use)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "conv_grad")
CONVS = [  # (batch, cin, cout, size, k, stride, pad)
    (2, 3, 5, 7, 3, 1, 1),
    (2, 4, 6, 9, 3, 2, 1),
    (2, 3, 4, 16, 7, 2, 3),
    (3, 6, 5, 5, 1, 1, 0),
    (2, 6, 8, 8, 1, 2, 0),
]
POOLS = [  # (batch, channels, size, k, stride, pad, integer-valued)
    (2, 4, 9, 3, 2, 1, False),
    (2, 3, 8, 3, 2, 1, True),
]


def main():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    out = {}

    def put(prefix, **tensors):
        for k, v in tensors.items():
            out[f"{prefix}.{k}"] = v.detach().to(torch.float32).contiguous()

    for i, (b, cin, cout, s, k, stride, pad) in enumerate(CONVS):
        x, w, bias = rnd(b, cin, s, s).requires_grad_(), rnd(cout, cin, k, k).requires_grad_(), rnd(cout).requires_grad_()
        y = F.conv2d(x, w, bias, stride=stride, padding=pad)
        dy = rnd(*y.shape)
        y.backward(dy)
        put(f"conv{i}", x=x, w=w, b=bias, dy=dy, dx=x.grad, dw=w.grad, db=bias.grad,
            geom=torch.tensor([cin, cout, k, stride, pad], dtype=torch.float64))

    x = (1.5 + 2.0 * rnd(3, 5, 4, 4)).requires_grad_()
    gamma, beta = (1.0 + 0.3 * rnd(5)).requires_grad_(), (0.2 * rnd(5)).requires_grad_()
    rm, rv = 0.1 * rnd(5), 1.0 + 0.2 * rnd(5).abs()
    rm_new, rv_new = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm_new, rv_new, gamma, beta, training=True, momentum=0.1, eps=1e-5)
    dy = rnd(*y.shape)
    y.backward(dy)
    put("bn", x=x, gamma=gamma, beta=beta, rm=rm, rv=rv, dy=dy, y=y, rm_new=rm_new, rv_new=rv_new,
        dx=x.grad, dgamma=gamma.grad, dbeta=beta.grad, geom=torch.tensor([0.1, 1e-5], dtype=torch.float64))

    for i, (b, c, s, k, stride, pad, ties) in enumerate(POOLS):
        x = rnd(b, c, s, s)
        if ties:
            x = torch.randint(0, 3, (b, c, s, s), generator=g).to(torch.float64)
        x.requires_grad_()
        y = F.max_pool2d(x, k, stride, pad)
        dy = rnd(*y.shape)
        y.backward(dy)
        put(f"pool{i}", x=x, dy=dy, y=y, dx=x.grad, geom=torch.tensor([k, stride, pad], dtype=torch.float64))

    x = rnd(2, 3, 4, 5).requires_grad_()
    y = x.mean((2, 3))
    dy = rnd(*y.shape)
    y.backward(dy)
    put("mean", x=x, dy=dy, dx=x.grad)

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "conv_grad.safetensors")
    save_file(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"wrote {len(out)} tensors to {path}")


if __name__ == "__main__":
    main()
