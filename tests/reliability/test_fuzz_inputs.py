"""Hypothesis on the input paths: image decoding, prompt encoding, the worker's request validation.

Each may refuse what it is given, but only with the service's typed errors (4xx): no other
exception, no crash, and the engine still serves afterwards. Examples: INPUT_EXAMPLES (CI) or
RELIABILITY_FULL=1 (ten times more).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_serve.engine.engine import BatchEngine
from llava_serve.errors import ImageError, InvalidRequest
from llava_serve.models.base import IMAGE_PLACEHOLDER
from llava_serve.models.images import ImageLimits, decode_base64_image, decode_image_bytes
from llava_serve.models.loader import LoadOptions, load_model
from llava_serve.worker.app import create_app
from llava_serve.worker.config import WorkerConfig
from tests.reliability.helpers import FULL, png_b64, record

SCALE = 10 if FULL else 1


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )


RESULTS: dict[str, dict[str, int]] = {}


def tally(name: str, outcome: str) -> None:
    RESULTS.setdefault(name, {}).setdefault(outcome, 0)
    RESULTS[name][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report() -> Any:
    yield
    record("fuzz_inputs", examples=RESULTS)


# -- images ---------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"]
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO"]


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A real image in a random mode, size and format, then maybe cut short or with bytes flipped."""
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    img = Image.new(mode, size)
    img.putdata([draw(st.integers(0, 255))] * (size[0] * size[1])) if mode in ("L", "P", "1") else None
    buf = io.BytesIO()
    try:
        img.save(buf, draw(st.sampled_from(FORMATS)))
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


LIMITS = st.builds(ImageLimits, max_bytes=st.integers(1, 1 << 20), max_pixels=st.integers(1, 10_000),
                   max_side=st.integers(1, 200), max_count=st.just(8))  # fmt: skip


@fuzz(300)
@given(data=st.one_of(encoded_images(), st.binary(max_size=2048)), limits=st.one_of(st.just(ImageLimits()), LIMITS))
def test_image_bytes_decode_or_refuse(data: bytes, limits: ImageLimits) -> None:
    try:
        decoded = decode_image_bytes(data, limits)
    except ImageError as exc:  # ImageTooLarge is one too
        tally("image bytes", type(exc).__name__)
        return
    tally("image bytes", "decoded")
    w, h = decoded.image.size
    assert decoded.image.mode == "RGB" and w * h <= limits.max_pixels and max(w, h) <= limits.max_side
    assert len(data) <= limits.max_bytes


@fuzz(200)
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.from_regex(r"(data:image/[a-z]+;base64,)?[A-Za-z0-9+/=\s]{0,80}"),
        st.sampled_from([png_b64(), " " + png_b64() + "\n", "data:image/png;base64," + png_b64()]),
    )
)
def test_base64_text_decodes_or_is_refused(text: str) -> None:
    try:
        decode_base64_image(text, ImageLimits())
        tally("base64 text", "decoded")
    except ImageError as exc:
        tally("base64 text", type(exc).__name__)


# -- prompt encoding ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tiny_llava) -> Any:  # type: ignore[no-untyped-def]
    return load_model(LoadOptions(model_path=str(tiny_llava), device="cpu", model_name="tiny-llava"))


PROMPT_TEXT = st.lists(st.one_of(st.text(max_size=40), st.just(IMAGE_PLACEHOLDER), st.just("<image"),
                                 st.just("</s>"), st.just("<s>")), max_size=12).map("".join)  # fmt: skip


def test_prompt_encoding_counts_image_tokens_or_refuses(lm: Any) -> None:
    per_image = lm.encode(IMAGE_PLACEHOLDER, [Image.new("RGB", (8, 8))]).input_ids.count(lm.image_token_id)
    vocab = lm.model.config.get_text_config().vocab_size

    @fuzz(200)
    @given(prompt=PROMPT_TEXT, n_images=st.integers(0, 3), sizes=st.tuples(st.integers(1, 64), st.integers(1, 64)))
    def check(prompt: str, n_images: int, sizes: tuple[int, int]) -> None:
        images = [Image.new("RGB", sizes, (i * 60, 30, 90)) for i in range(n_images)]
        try:
            encoded = lm.encode(prompt, images)
        except InvalidRequest as exc:  # count mismatch, context overflow
            tally("encode", type(exc).__name__)
            assert prompt.count(IMAGE_PLACEHOLDER) != n_images or "context" in str(exc)
            return
        tally("encode", "encoded")
        ids = encoded.input_ids
        assert prompt.count(IMAGE_PLACEHOLDER) == n_images and len(ids) < lm.context_length
        assert ids.count(lm.image_token_id) == n_images * per_image
        assert all(0 <= i < vocab for i in ids)

    check()


# -- the worker's request validation --------------------------------------------------------------
def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                       st.text(max_size=20))  # fmt: skip
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=6)  # fmt: skip


TINY = st.sampled_from([0.0, 1e-300, 1e-40, 1e-3, 1.0000001e-3, 5e-324])
VALIDISH = {  # in or at the edge of each field's range (the schema's bounds, and past them)
    "images": st.lists(st.one_of(st.just(png_b64()), st.text(max_size=30)), max_size=2),
    "temperature": st.one_of(st.floats(-1, 101), TINY),
    "top_p": st.one_of(st.floats(-0.1, 1.1), TINY),
    "top_k": st.integers(-5, 600),
    "repetition_penalty": st.one_of(st.floats(-1, 11), TINY),
    "max_new_tokens": st.one_of(st.integers(-3, 6), st.integers(1_000_001, 2**70)),  # never a long run
    # (absent, the body below gets 4: the default, 256, would make every example a long one)
    "stop": st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(-(2**70), 2**70), max_size=3)),
    "seed": st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "request_id": st.one_of(st.none(), st.text(max_size=20)),
}
GARBAGE = {name: json_values() for name in ("prompt", *VALIDISH)}
BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": PROMPT_TEXT}, optional=VALIDISH),
    st.fixed_dictionaries({}, optional=GARBAGE),
    json_values(),
)

SHORT_BODIES = BODIES.map(lambda b: {"max_new_tokens": 4, **b} if isinstance(b, dict) else b)


@pytest.fixture(scope="module")
def worker(lm: Any) -> Any:
    engine = BatchEngine(lm, max_running=4, max_waiting=8).start()
    app = create_app(WorkerConfig(no_register=True), lm, engine)
    yield app
    app.state.service.close()
    engine.shutdown()


async def post(app: Any, path: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
        return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_worker_request_validation(worker: Any) -> None:
    known = {"prompt": "hi", "max_new_tokens": 6, "temperature": 0}
    reference = asyncio.run(post(worker, "/worker_generate", known))
    assert reference.status_code == 200

    @fuzz(150)
    @given(body=SHORT_BODIES, path=st.sampled_from(["/worker_generate", "/worker_generate_stream", "/count_token"]))
    def check(body: Any, path: str) -> None:
        resp = asyncio.run(post(worker, path, body))
        tally("worker request", str(resp.status_code))
        assert resp.status_code in (200, 400, 413, 429), (body, resp.status_code, resp.text[:300])
        frames = [json.loads(f) for f in resp.content.split(b"\0") if f.strip()]
        assert frames and all("error_code" in f or "count" in f for f in frames), resp.text[:300]
        if resp.status_code == 200 and "finish_reason" in frames[-1]:
            assert frames[-1]["finish_reason"] != "error", frames[-1]

    check()
    engine = worker.state.engine
    assert engine.is_ready() and engine.queue_length() == 0  # alive, nothing stuck
    after = asyncio.run(post(worker, "/worker_generate", known))
    assert after.json() == reference.json()
