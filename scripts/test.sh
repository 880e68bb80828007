#!/usr/bin/env bash
# The test command: lint, type-check, then the whole test suite (unit, component, e2e, browser).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
ruff check llava_serve tests
mypy
python -m pytest -q -p no:cacheprovider "$@"
