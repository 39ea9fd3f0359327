"""Shared bootstrap for the Python tools: each script calls ensure_venv() first.

The tools need PyTorch, timm, torchvision, numpy, scipy and scikit-learn; CI never runs them. The first
call creates tools/.venv, installs tools/requirements.txt into it, and re-executes the script with the
venv's interpreter, so `python3 tools/<script>.py` works on a fresh machine.
"""
import os
import subprocess
import sys
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv")
REQS = os.path.join(HERE, "requirements.txt")


def ensure_venv():
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".requirements-installed")
    reqs = open(REQS).read()
    if not os.path.exists(py):
        print(f"creating {VENV} (one time)...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not os.path.exists(stamp) or open(stamp).read() != reqs:
        print(f"installing {REQS} into {VENV}...", file=sys.stderr)
        subprocess.check_call([py, "-m", "pip", "install", "-q", "-r", REQS])
        with open(stamp, "w") as f:
            f.write(reqs)
    os.execv(py, [py] + sys.argv)
