#!/usr/bin/env python3
"""`mood bench` and timm side by side on the same machine, threads and batch, with the ratio.

    python3 tools/bench_pytorch.py [--arch beit_base_patch16_224] [--batch 8] [--iters 5] [--threads 2] [--train]

Each side runs `--rounds` times, alternating (mood, torch, mood, torch, ...), and the best median of
each is compared, so a noisy neighbour hurts both alike. PyTorch: timm model with random weights,
eval mode, torch.inference_mode(), float32, torch.set_num_threads(threads). Also printed: the sgemm
rate of PyTorch (MKL) and of the `gemm` crate on the model's largest GEMM shape (fc1), since the forward
is ~90% GEMM on this CPU and that rate is the physical limit.

--train times full fine-tuning steps on both sides instead: forward, cross-entropy with label
smoothing 0.1, backward, clip_grad_norm_(1.0), AdamW (timm model in train mode with drop-path 0, as
`mood bench --train`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def bench_mood(binary, arch, batch, iters, threads, train):
    cmd = [binary, "--threads", str(threads), "bench", "--arch", arch, "--batch", str(batch), "--iters", str(iters),
           "--json"] + (["--train"] if train else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_torch(model, x, iters):
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return x.shape[0] / times[len(times) // 2]


def bench_torch_train(model, x, iters):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    y = torch.arange(x.shape[0]) % 1000
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return x.shape[0] / times[len(times) // 2]


def torch_sgemm(m, k, n, reps=5):
    a, w = torch.randn(m, k), torch.randn(n, k)
    torch.nn.functional.linear(a, w)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2] / 1e9  # median, like the model timings


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="beit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mood", default=os.path.join(ROOT, "target", "release", "mood"))
    p.add_argument("--train", action="store_true")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    model = timm.create_model(a.arch, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if hasattr(model, "pretrained_cfg") else 224
    x = torch.randn(a.batch, 3, size, size)
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(bench_mood(a.mood, a.arch, a.batch, a.iters, a.threads, a.train))
        theirs.append(bench_torch_train(model, x, a.iters) if a.train else bench_torch(model, x, a.iters))
    best = max(ours, key=lambda r: r["img_per_s"])
    torch_ips = max(theirs)
    gflop = best["gflop_per_image"]
    m, k, n = best["sgemm_shape"]
    tsg = torch_sgemm(m, k, n)

    mode = "training steps" if a.train else "inference"
    print(f"# {a.arch} {mode}, fp32, batch {a.batch}, {a.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, timm {timm.__version__}")
    print(f"| engine | images/s | GFLOP/s | sgemm {m}x{k}x{n} GFLOP/s | model / own sgemm |")
    print("|---|---:|---:|---:|---:|")
    print(f"| mood | {best['img_per_s']:.3f} | {best['gflop_per_s']:.1f} | {best['sgemm_gflop_per_s']:.1f} (gemm crate) "
          f"| {100 * best['fraction_of_sgemm']:.1f}% |")
    print(f"| PyTorch eager{' (train)' if a.train else ''} | {torch_ips:.3f} | {torch_ips * gflop:.1f} | {tsg:.1f} (MKL) | {100 * torch_ips * gflop / tsg:.1f}% |")
    print(f"\nratio mood / PyTorch: {best['img_per_s'] / torch_ips:.3f}x  "
          f"(all rounds, img/s: mood {[round(r['img_per_s'], 3) for r in ours]}, torch {[round(t, 3) for t in theirs]})")


if __name__ == "__main__":
    main()
