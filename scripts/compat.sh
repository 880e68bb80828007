#!/usr/bin/env bash
# Run LLaVA's and FastChat's real clients against a controller + worker on the bundled model
# (docs/compatibility.md). Installs FastChat 0.2.36, the openai SDK and LLaVA into throwaway venvs under
# WORK; needs PyPI. Not part of CI.
#
#   scripts/compat.sh [WORK]        WORK defaults to a fresh temp folder
#   PYTHON=...     the project's python (torch, transformers): default .venv/bin/python, else python3
#   PORT_BASE=...  controller PORT_BASE+1, worker +2, FastChat API +3 (default 31000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$(mktemp -d)}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || echo python3)}
BASE=${PORT_BASE:-31000}
CTRL=http://localhost:$((BASE + 1)) WORKER=http://localhost:$((BASE + 2)) API=http://localhost:$((BASE + 3))
MODEL=llava-shapes
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK/logs"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
start() { local log=$1; shift; "$@" >"$WORK/logs/$log.log" 2>&1 & PIDS+=($!); }
wait_for() {  # wait_for URL PATTERN: poll a POST until its answer matches
    for _ in $(seq 300); do
        curl -sf -X POST "$1" 2>/dev/null | grep -q "$2" && return 0
        sleep 1
    done
    echo "timed out waiting for $1" >&2; return 1
}

step "throwaway venvs in $WORK"
if [ ! -x "$WORK/fastchat/bin/python" ]; then
    python3 -m venv "$WORK/fastchat"
    # FastChat 0.2.36's streaming calls pydantic v1's .json(ensure_ascii=...): it needs pydantic<2
    "$WORK/fastchat/bin/pip" install -q "fschat==0.2.36" "pydantic<2" "fastapi<0.100" aiohttp shortuuid \
        tiktoken uvicorn httpx requests psutil pillow openai
    # test_message imports fastchat.model (torch, transformers): run it with the project's python
    "$WORK/fastchat/bin/pip" install -q --no-deps --target "$WORK/fschat-nodeps" "fschat==0.2.36"
fi
if [ ! -d "$WORK/llava-nodeps" ]; then
    # LLaVA's own release (llava-torch on PyPI). llava/__init__.py imports its model classes (torch,
    # transformers), so like FastChat's test_message it runs with the project's python
    "$WORK/fastchat/bin/pip" install -q --no-deps --target "$WORK/llava-nodeps" "llava-torch==1.2.2.post1"
fi
"$WORK/fastchat/bin/pip" list 2>/dev/null | grep -iE '^(fschat|openai|pydantic|fastapi) '

step "controller, worker (bundled model), FastChat openai_api_server"
start controller "$PYTHON" -m llava_serve.controller --port $((BASE + 1))
start worker "$PYTHON" -m llava_serve.model_worker --port $((BASE + 2)) --worker-address "$WORKER" \
    --controller-address "$CTRL"
wait_for "$CTRL/list_models" "$MODEL"
# run from WORK: it writes its own log file into the current folder
start fastchat-api bash -c 'cd "$0" && exec "$1" -m fastchat.serve.openai_api_server --controller-address "$2" --port "$3"' \
    "$WORK" "$WORK/fastchat/bin/python" "$CTRL" $((BASE + 3))
for _ in $(seq 60); do curl -sf "$API/v1/models" >/dev/null && break; sleep 1; done

step "openai SDK -> FastChat openai_api_server -> our controller and worker"
"$WORK/fastchat/bin/python" scripts/compat_client.py "$API/v1" "$MODEL"

step "FastChat: python -m fastchat.serve.test_message"
PYTHONPATH="$WORK/fschat-nodeps" "$PYTHON" -m fastchat.serve.test_message --controller-address "$CTRL" \
    --model-name "$MODEL" --message "Describe the image."

step "FastChat controller routes"
curl -s -X POST "$CTRL/list_multimodal_models"; echo
curl -s -X POST "$CTRL/list_language_models"; echo
curl -s "$CTRL/test_connection"; echo

step "LLaVA: python -m llava.serve.test_message (llava-torch 1.2.2.post1, LLaVA's release on PyPI)"
# it prints the prompt with its separator " " as newlines, then each frame's last word with \r
PYTHONPATH="$WORK/llava-nodeps" "$PYTHON" -m llava.serve.test_message --controller-address "$CTRL" \
    --model-name "$MODEL" | tr '\r' '\n' | grep -v '^$' | sed -n '1,2p;$p' 

step "README's curl example, as written"
IMG=$("$PYTHON" -c "from llava_serve.models.images import encode_image_base64; from PIL import Image, ImageDraw
im = Image.new('RGB', (96, 96), 'white'); ImageDraw.Draw(im).ellipse((20, 20, 76, 76), fill='red'); print(encode_image_base64(im))")
curl -s "$WORKER/worker_generate_stream" -d "{\"prompt\": \"USER: <image>\nWhat is this? ASSISTANT:\",
  \"images\": [\"$IMG\"], \"temperature\": 0, \"max_new_tokens\": 64}" | tr '\0' '\n' | tail -n 2
echo; echo "logs: $WORK/logs"
