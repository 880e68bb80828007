#!/usr/bin/env bash
# Install llava-serve into ./.venv. The CPU build of torch is installed first so that pip never
# pulls a multi-GB CUDA build; GPU users install their own torch into the venv before this.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # plus test tools (pytest, ruff, mypy, openai, playwright, bitsandbytes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e ".[quant]"
fi
echo "installed llava-serve into $(pwd)/.venv"
