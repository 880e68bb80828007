#!/usr/bin/env bash
# The test command: lint, type-check, then the whole test suite (unit, component, e2e, browser).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
ruff check llava_serve tests --exclude llava_serve/default_model/_dev
ruff format --check llava_serve tests --exclude llava_serve/default_model/_dev
mypy
# tests/reliability runs too: fault injection, fuzzing (reduced; RELIABILITY_FULL=1 for the full
# runs) and the 1-minute soak. See docs/reliability.md.
python -m pytest -q -p no:cacheprovider "$@"
