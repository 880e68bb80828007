#!/usr/bin/env bash
# Install llava-serve into ./.venv. PyTorch is installed first so that pip never pulls a multi-GB
# CUDA build onto a machine without an NVIDIA GPU:
#   - a torch already in .venv is kept (GPU users install the build for their CUDA first);
#   - no NVIDIA GPU: the CPU build from PyTorch's CPU wheel index when that index answers, else
#     torch==2.13.0 from the configured index (on PyPI alone that may be the CUDA build: said below);
#   - an NVIDIA GPU: torch==2.13.0 from the configured index (a CUDA build).
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # plus test tools (pytest, ruff, mypy, playwright, bitsandbytes, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

command -v "$PY" >/dev/null || { echo "install.sh: $PY not found; install Python >= 3.10 (or set PYTHON=...)" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "install.sh: llava-serve needs Python >= 3.10; $PY is $("$PY" -V 2>&1) (set PYTHON=python3.11, say)" >&2; exit 1; }
if ! [ -x .venv/bin/python ]; then
  "$PY" -m venv .venv 2>/dev/null || {
    echo "install.sh: '$PY -m venv' failed; install the venv module (Debian/Ubuntu: apt install python3-venv)" >&2
    rm -rf .venv; exit 1; }
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

install_torch() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: NVIDIA GPU found: torch==$TORCH from the configured index (a CUDA build)"
    python -m pip install -q "torch==$TORCH"
  elif python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
       "$CPU_INDEX" >/dev/null 2>&1; then
    echo "install.sh: no NVIDIA GPU: the CPU build of torch==$TORCH from $CPU_INDEX"
    python -m pip install -q --index-url "$CPU_INDEX" --extra-index-url "$(python -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)" "torch==$TORCH"
  else
    echo "install.sh: no NVIDIA GPU, and $CPU_INDEX cannot be reached: torch==$TORCH from the configured index"
    echo "install.sh: (if that is PyPI alone, this is the CUDA build, several GB; to avoid it, install the CPU build"
    echo "install.sh:  into .venv yourself first: pip install --index-url $CPU_INDEX torch)"
    python -m pip install -q "torch==$TORCH"
  fi
}
python -c "import torch" 2>/dev/null || install_torch
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e ".[quant]"
fi
echo "installed llava-serve into $(pwd)/.venv; run it as .venv/bin/llava-serve, or '. .venv/bin/activate' first"
