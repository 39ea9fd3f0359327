#!/usr/bin/env bash
# Installs NVRTC 13.0 and the CUDA headers from pinned pip wheels into .cuda-wheels/ (no GPU, no
# toolkit needed) and prints the directory holding lib/ and include/. CUDA tests need NVRTC to
# compile kernels/*.cu, on a GPU and on the CPU stand-in alike; tests/common/cuda.rs runs this
# when NVRTC is not on the loader path, and .ci/run runs it first.
# 13.0 matches the GPU host's driver 580 (a newer NVRTC emits PTX that driver cannot load). The
# venv is reused while its pin list is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)
VENV=.cuda-wheels
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "${WHEELS[*]}" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q --no-cache-dir "${WHEELS[@]}" >&2
    echo "${WHEELS[*]}" > "$VENV/.pins"
fi
"$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))'
