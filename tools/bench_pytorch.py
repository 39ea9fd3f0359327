#!/usr/bin/env python3
"""`mood bench` and timm side by side on the same machine, threads and batch, with the ratio.

    python3 tools/bench_pytorch.py [--arch beit_base_patch16_224] [--batch 8] [--iters 5] [--threads 2] [--train]
    python3 tools/bench_pytorch.py --device cuda [--arch beit_large_patch16_224|resnet50] [--batch 256] [--peak-tflops 989]

Each side runs `--rounds` times, alternating (mood, torch, mood, torch, ...), and the best median of
each is compared, so a noisy neighbour hurts both alike. PyTorch: timm model with random weights,
eval mode, torch.inference_mode(), float32, torch.set_num_threads(threads). Also printed: the sgemm
rate of PyTorch (MKL) and of the `gemm` crate on the model's largest GEMM shape (fc1), since the forward
is ~90% GEMM on this CPU and that rate is the physical limit.

--train times full fine-tuning steps on both sides instead: forward, cross-entropy with label
smoothing 0.1, backward, clip_grad_norm_(1.0), AdamW (timm model in train mode with drop-path 0, as
`mood bench --train`).

--device cuda --train: the fine-tuning step on one GPU, `mood bench --train --device cuda --precision
bf16` beside timm eager with its forward and loss under torch.autocast(bfloat16) (same loss, clipping
and AdamW as above), CUDA events around each step.

--device cuda compares on one GPU instead (inference), all in bf16 with f32 accumulation:
`mood bench --device cuda --precision bf16`, timm eager under torch.autocast(bfloat16), and the same
model through torch.compile (inductor, default mode). Timing: CUDA events around each forward after
warm-up (compile warm-up included before timing), median of --iters. GFLOP per image is 35.2 for
*_base_patch16_224 and 123.2 for *_large_patch16_224 (2 x timm's 17.58 / 61.6 GMACs), else
mood's own count; MFU is against --peak-tflops (default 989: H100/H200 SXM dense bf16).
With --device cuda the script uses the interpreter's own torch and timm (no tools/.venv: a GPU box
may have no network, and its torch must match its driver).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402


def _device_from_argv(argv):
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cpu"


if _device_from_argv(sys.argv) != "cuda":
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
    y = torch.arange(x.shape[0]) % model.num_classes
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


def bench_mood_cuda(binary, arch, batch, iters, train=False):
    cmd = [binary, "bench", "--device", "cuda", "--precision", "bf16", "--arch", arch, "--batch", str(batch),
           "--iters", str(iters), "--json"] + (["--train"] if train else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"mood bench --device cuda failed: {out.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_torch_cuda(model, x, iters, warmup):
    """Median img/s of model(x) under bf16 autocast, timed with CUDA events."""
    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return x.shape[0] / times[len(times) // 2]


def bench_torch_cuda_train(model, x, iters, warmup):
    """Median img/s of fine-tuning steps under bf16 autocast (forward and loss autocast, backward,
    clip_grad_norm_(1.0), AdamW), `mood bench --train --device cuda`'s step, timed with CUDA events."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    y = torch.arange(x.shape[0], device=x.device) % model.num_classes
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return x.shape[0] / times[len(times) // 2]


def main_cuda_train(a):
    """The training step on one GPU: mood against timm eager under bf16 autocast (issue 13's goal:
    >= 1.2x). FLOPs per image: three forwards'."""
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(0)
    model = make_model(a.arch).cuda()
    size = input_size(model, a.arch)
    x = torch.randn(a.batch, 3, size, size, device="cuda")
    ours = bench_mood_cuda(a.mood, a.arch, a.batch, a.iters, train=True) if os.path.exists(a.mood) else None
    known = gflop_per_image(a.arch, None)  # NaN for a model without a published count
    gflop = 3 * known if known == known else (ours["gflop_per_image"] if ours else float("nan"))
    rows = []
    if ours:
        rows.append(("mood (bf16 GEMMs, device AdamW)", ours["img_per_s"]))
    eager = bench_torch_cuda_train(model, x, a.iters, warmup=3)
    rows.append(("timm eager, autocast bf16", eager))
    print(f"# {a.arch} training steps, bf16, batch {a.batch}, {name}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{gflop} GFLOP/image (3 forwards), peak {a.peak_tflops} TFLOP/s")
    print("| engine | images/s | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|")
    for label, ips in rows:
        tflops = ips * gflop / 1e3
        print(f"| {label} | {ips:.1f} | {tflops:.1f} | {100 * tflops / a.peak_tflops:.1f}% |")
    if ours:
        print(f"\nratio mood / timm eager (training step): {ours['img_per_s'] / eager:.3f}x")


def gflop_per_image(arch, mood_result):
    if "_large_patch16_224" in arch:
        return 123.2
    if "_base_patch16_224" in arch:
        return 35.2
    return mood_result["gflop_per_image"] if mood_result else float("nan")


def make_model(arch):
    """timm's model for `arch`; mood's own small presets, which timm does not register, are built
    from timm's Beit class with the same configuration."""
    if arch == "beit_tiny_patch8_32":  # the demo model: 32x32 digits, 4x4 patches, abs + rel pos
        from timm.models.beit import Beit
        return Beit(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4,
                    num_classes=10, use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=0.1)
    if arch.startswith("resnet"):  # timm's ResNets; MODE's *_cifar: 3x3 stride-1 stem, no max-pool
        cifar = arch.endswith("_cifar")
        classes = {"resnet18_cifar": 10, "resnet34_cifar": 100}.get(arch, 1000)
        m = timm.create_model(arch.replace("_cifar", ""), pretrained=False, num_classes=classes)
        if cifar:
            m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            m.maxpool = torch.nn.Identity()
        return m
    return timm.create_model(arch, pretrained=False)


def input_size(model, arch):
    if arch.startswith("resnet"):
        return 32 if arch.endswith("_cifar") else 224
    return model.patch_embed.img_size[0]


def main_cuda(a):
    if not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # bf16 autocast covers the GEMMs; keep f32 ops exact
    name = torch.cuda.get_device_name(0)
    model = make_model(a.arch).eval().cuda()
    size = input_size(model, a.arch)
    x = torch.randn(a.batch, 3, size, size, device="cuda")
    rows = []
    ours = bench_mood_cuda(a.mood, a.arch, a.batch, a.iters) if os.path.exists(a.mood) else None
    gflop = gflop_per_image(a.arch, ours)
    if ours:
        # The convolutional benches time images in from the host and features back (as extraction
        # runs them); the ViT bench and timm's rows keep the batch on the device.
        conv = a.arch.startswith("resnet")
        label = "mood (bf16 im2col GEMMs, host transfers included)" if conv else "mood (bf16 GEMMs, fused attention)"
        rows.append((label, ours["img_per_s"]))
    rows.append(("timm eager, autocast bf16", bench_torch_cuda(model, x, a.iters, warmup=3)))
    compiled = torch.compile(model)
    rows.append(("timm torch.compile, autocast bf16", bench_torch_cuda(compiled, x, a.iters, warmup=5)))
    print(f"# {a.arch} inference, bf16, batch {a.batch}, {name}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{gflop} GFLOP/image, peak {a.peak_tflops} TFLOP/s")
    print("| engine | images/s | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|")
    for label, ips in rows:
        tflops = ips * gflop / 1e3
        print(f"| {label} | {ips:.1f} | {tflops:.1f} | {100 * tflops / a.peak_tflops:.1f}% |")
    if ours:
        print(f"\nratio mood / timm eager: {ours['img_per_s'] / rows[1][1]:.3f}x, "
              f"mood / torch.compile: {ours['img_per_s'] / rows[2][1]:.3f}x")


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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="--device cuda: MFU denominator")
    a = p.parse_args()
    if a.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        return main_cuda_train(a) if a.train else main_cuda(a)

    torch.set_num_threads(a.threads)
    model = make_model(a.arch).eval()
    size = input_size(model, a.arch)
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
