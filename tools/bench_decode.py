#!/usr/bin/env python3
"""Decode + preprocess throughput, mood against PIL + torchvision, on the same files, thread
counts and machine, printed as ratios (issue: data pipeline, throughput).

    python3 tools/bench_decode.py [--data DIR] [--threads 1,2] [--presets mood,moodv2] [--rounds 3]

The folder defaults to the one tools/make_imagenet_like.py writes (made first if missing).
- torchvision: what a PyTorch DataLoader worker does per image: torchvision.datasets.folder's
  pil_loader (PIL open + convert('RGB')), then the preset's Resize / CenterCrop / ToTensor /
  Normalize. One process per thread (a multiprocessing Pool, as DataLoader workers are); torch
  itself limited to 1 intra-op thread per process.
- mood: `mood --threads N bench --data DIR --preset P` (the loader half of `mood extract`).
Each side: one warm-up pass over every file, then the median of --rounds timed passes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _venv import ensure_venv  # noqa: E402

ensure_venv()

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def transform(preset, s):
    import torchvision.transforms as T
    bic, bil = T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR
    half = ([0.5] * 3, [0.5] * 3)
    steps = {
        "mood": ([T.Resize(int(s / 0.875), interpolation=bic), T.CenterCrop(s)], half),
        "moodv2": ([T.Resize((s, s), interpolation=bil)], half),
        "imagenet": ([T.Resize(int(s / 0.875), interpolation=bic), T.CenterCrop(s)],
                     ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])),
    }[preset]
    return T.Compose(steps[0] + [T.ToTensor(), T.Normalize(*steps[1])])


_T = None


def _init(preset, s):
    global _T
    import torch
    torch.set_num_threads(1)
    _T = transform(preset, s)


def _one(path):
    from PIL import Image
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    return _T(img).shape[0]


def time_torchvision(paths, preset, s, threads, rounds):
    with mp.get_context("fork").Pool(threads, initializer=_init, initargs=(preset, s)) as pool:
        pool.map(_one, paths, chunksize=16)  # warm-up
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            pool.map(_one, paths, chunksize=16)
            times.append(time.perf_counter() - t)
    times.sort()
    return len(paths) / times[len(times) // 2]


def time_mood(binary, data, preset, s, threads, rounds):
    out = subprocess.run([binary, "--threads", str(threads), "bench", "--data", data, "--preset", preset,
                          "--img-size", str(s), "--iters", str(rounds), "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/mood-imagenet-like")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--presets", default="mood,moodv2")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "mood"))
    a = ap.parse_args()
    if not os.path.isdir(a.data):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_imagenet_like.py"), "--out", a.data],
                       check=True)
    if not os.path.exists(a.binary):
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(a.data) for f in fs if f.endswith(".jpg"))
    import PIL
    import torchvision
    print(f"# decode + preprocess, {len(paths)} files in {a.data}; {platform.processor() or platform.machine()}, "
          f"Pillow {PIL.__version__}, torchvision {torchvision.__version__}")
    print("| preset | threads | torchvision img/s | mood img/s | mood / torchvision |")
    print("|---|---|---|---|---|")
    for preset in a.presets.split(","):
        for th in (int(t) for t in a.threads.split(",")):
            tv = time_torchvision(paths, preset, a.img_size, th, a.rounds)
            mo = time_mood(a.binary, a.data, preset, a.img_size, th, a.rounds)
            print(f"| {preset} | {th} | {tv:.1f} | {mo:.1f} | **{mo / tv:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
