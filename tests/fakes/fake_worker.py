"""A fake model worker: a real uvicorn process that speaks the worker contract (SPEC 3).

    python -m tests.fakes.fake_worker --port 31002 --controller-address http://127.0.0.1:31001 \
        --model-name fake --registration-secret s --heart-beat-interval 1 --frame-delay 0.05

It registers with the controller (sending X-Registration-Secret), heartbeats and re-registers when
the controller forgets it, unregisters on SIGTERM, and streams deterministic `\\0`-delimited
frames: the output is `images=<k> ` followed by `tok1 tok2 ...` (one word per frame, `--frame-delay`
apart), so tests can kill it mid-stream. Every frame carries `"worker": <its address>` so a test
can tell who served a request. Test-only routes: GET /stats (active / completed / cancelled
streams) and GET /last_requests (the bodies it received).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llava_serve.common.attest import ATTEST_PATH
from llava_serve.common.auth import add_bearer_auth
from llava_serve.errors import ErrorCode
from llava_serve.protocol.frames import FinishReason, Frame, Usage, encode_frame
from llava_serve.protocol.worker import GenerateRequest, WorkerStatus
from llava_serve.worker.attest import add_attest_route


class TaggedFrame(Frame):
    """A frame that names the worker that sent it, so tests can tell where a request went."""

    worker: str = ""


logger = logging.getLogger("fake_worker")
CONTEXT_LENGTH = 4096


@dataclass
class FakeConfig:
    port: int
    controller_address: str
    model_name: str = "fake"
    worker_address: str = ""
    registration_secret: str | None = None
    api_key: str | None = None
    heart_beat_interval: float = 1.0
    frame_delay: float = 0.02
    num_tokens: int = 8
    speed: float = 1.0
    max_concurrency: int = 1000
    no_register: bool = False
    register_without_status: bool = False


@dataclass
class FakeState:
    config: FakeConfig
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    received: int = 0  # generation requests (HTTP calls), however many choices each asked for

    def status(self) -> dict[str, Any]:
        c = self.config
        return {"model_names": [c.model_name], "speed": c.speed, "queue_length": self.active}


def build_prompt(messages: list[dict[str, Any]]) -> str:
    """A toy template: 'ROLE: text' lines, `<image>` per image part, ending 'ASSISTANT:'."""
    lines = []
    for msg in messages:
        parts = ["<image>" if p["type"] == "image" else p["text"] for p in msg["content"]]
        lines.append(f"{msg['role'].upper()}: {' '.join(parts)}")
    return "\n".join([*lines, "ASSISTANT:"])


def output_words(req: GenerateRequest, num_tokens: int) -> list[str]:
    n = min(req.max_new_tokens, num_tokens)
    return [f"images={len(req.images or [])}", *(f"tok{i}" for i in range(1, n))][:n]


def check(req: GenerateRequest, state: FakeState) -> JSONResponse | None:
    """The worker's 4xx answers, each one JSON object with a FastChat code."""
    n_images = len(req.images or [])
    if req.prompt.count("<image>") != n_images:
        return _error(
            400,
            ErrorCode.IMAGE_COUNT_MISMATCH,
            f"prompt has {req.prompt.count('<image>')} <image> placeholders but {n_images} images were sent",
        )
    if len(req.prompt) > CONTEXT_LENGTH:
        return _error(400, ErrorCode.CONTEXT_OVERFLOW, f"prompt of {len(req.prompt)} tokens exceeds the context")
    if state.active >= state.config.max_concurrency:
        return _error(429, ErrorCode.ENGINE_OVERLOADED, "worker overloaded", {"retry-after": "1"})
    return None


def _error(status: int, code: ErrorCode, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(Frame.failure(int(code), text).body(), status_code=status, headers=headers)


async def chat_frames(req: GenerateRequest, state: FakeState, n: int) -> AsyncIterator[bytes]:
    for index in range(n):
        async for raw in stream(req, state, index if n > 1 else None):
            yield raw


async def stream(req: GenerateRequest, state: FakeState, index: int | None = None) -> AsyncIterator[bytes]:
    cfg = state.config
    words = output_words(req, cfg.num_tokens)
    prefix = req.prompt if req.echo else ""
    out, reason = "", "length" if len(words) >= req.max_new_tokens else "stop"
    state.active += 1
    try:
        for i, word in enumerate(words):
            await asyncio.sleep(cfg.frame_delay)
            out = f"{out} {word}".strip()
            if "FAIL_MIDSTREAM" in req.prompt and i == 1:
                failed = Frame.failure(50001, "engine failed", finish_reason=FinishReason.ERROR)
                yield encode_frame(TaggedFrame(**failed.model_dump(), worker=cfg.worker_address))
                return
            cut = [out.index(s) for s in req.stop_list() if s in out]
            if cut:
                out, reason = out[: min(cut)], "stop"
            last = cut or i == len(words) - 1
            yield encode_frame(
                _frame(
                    prefix + out,
                    req,
                    len(out.split()) if out else 0,
                    reason if last else None,
                    cfg.worker_address,
                    index,
                )
            )
            if last:
                break
        state.completed += 1
    except (asyncio.CancelledError, GeneratorExit):
        state.cancelled += 1
        raise
    finally:
        state.active -= 1


def _frame(
    text: str, req: GenerateRequest, n_out: int, reason: str | None, worker: str, index: int | None
) -> TaggedFrame:
    if reason is None:
        return TaggedFrame(text=text, worker=worker, index=index)
    n_prompt = len(req.prompt.split()) + 10 * len(req.images or [])
    usage = Usage.of(n_prompt, n_out)
    return TaggedFrame(text=text, worker=worker, finish_reason=FinishReason(reason), usage=usage, index=index)


def create_app(config: FakeConfig) -> FastAPI:
    state = FakeState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        headers = {"x-registration-secret": config.registration_secret} if config.registration_secret else {}
        async with httpx.AsyncClient(
            base_url=config.controller_address, headers=headers, timeout=5, trust_env=False
        ) as client:
            task = None if config.no_register else asyncio.create_task(heart_beat_loop(client, state))
            yield
            if task is not None:
                task.cancel()
                with contextlib.suppress(httpx.HTTPError):
                    await client.post("/unregister_worker", json={"worker_name": config.worker_address})

    app = FastAPI(lifespan=lifespan)
    app.state.fake = state
    if config.api_key:
        add_bearer_auth(app, [config.api_key], exempt_paths={"/health", ATTEST_PATH})
    add_attest_route(app, config.registration_secret, config.worker_address, lambda: WorkerStatus(**state.status()))

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.received += 1
        req = GenerateRequest.model_validate(body)
        refused = check(req, state)
        return refused or StreamingResponse(stream(req, state), media_type="application/octet-stream")

    @app.post("/worker_chat_stream")
    async def chat_stream(request: Request) -> Response:
        """Renders the messages with the toy template, then streams each of the n choices in turn."""
        body = await request.json()
        n = int(body.pop("n", 1))
        body = {**body, "prompt": build_prompt(body.get("messages", [])), "echo": False}
        state.requests.append(body)
        state.received += 1
        req = GenerateRequest.model_validate(body)
        refused = check(req, state)
        return refused or StreamingResponse(chat_frames(req, state, n), media_type="application/octet-stream")

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return state.status()

    @app.post("/worker_build_prompt")
    async def worker_build_prompt(request: Request) -> dict[str, str]:
        return {"prompt": build_prompt((await request.json())["messages"])}

    @app.post("/model_details")
    async def model_details() -> dict[str, Any]:
        return {"context_length": CONTEXT_LENGTH, "is_multimodal": True, "model_name": config.model_name}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return {
            "active": state.active,
            "completed": state.completed,
            "cancelled": state.cancelled,
            "received": state.received,
        }

    @app.get("/last_requests")
    async def last_requests() -> list[dict[str, Any]]:
        return state.requests[-20:]

    return app


async def heart_beat_loop(client: httpx.AsyncClient, state: FakeState) -> None:
    """Register, then heartbeat; re-register whenever the controller does not know us."""
    registered = False
    while True:
        try:
            registered = await (heart_beat(client, state) if registered else register(client, state))
        except httpx.HTTPError as exc:
            logger.warning("controller unreachable: %s", exc)
            registered = False
        await asyncio.sleep(state.config.heart_beat_interval if registered else 0.2)


async def register(client: httpx.AsyncClient, state: FakeState) -> bool:
    body: dict[str, Any] = {"worker_name": state.config.worker_address, "check_heart_beat": True}
    if not state.config.register_without_status:
        body["worker_status"] = state.status()
    resp = await client.post("/register_worker", json=body)
    logger.info("register -> %s %s", resp.status_code, resp.text)
    return resp.status_code == 200


async def heart_beat(client: httpx.AsyncClient, state: FakeState) -> bool:
    body = {"worker_name": state.config.worker_address, "queue_length": state.active}
    resp = await client.post("/receive_heart_beat", json=body)
    return resp.status_code == 200 and bool(resp.json()["exist"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--controller-address", default="http://127.0.0.1:21001")
    for name in ("model-name", "registration-secret", "api-key"):
        p.add_argument(f"--{name}")
    for name in ("heart-beat-interval", "frame-delay", "speed"):
        p.add_argument(f"--{name}", type=float)
    p.add_argument("--num-tokens", type=int)
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--register-without-status", action="store_true")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    config = FakeConfig(worker_address=f"http://127.0.0.1:{args['port']}", **args)
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(
        create_app(config),
        host="127.0.0.1",
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
