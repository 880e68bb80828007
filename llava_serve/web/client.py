"""The demo's HTTP client of the controller (and of a worker's /worker_build_prompt).

Every failure comes out as a `ServeError` whose message a person can read: connection refused,
timeouts, HTTP errors (their FastChat-style body when there is one) and error frames. The chat
shows that message; nothing here prints, retries silently or hides the cause.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from llava_serve.common.frames import iter_frames
from llava_serve.errors import ErrorCode, NoWorker, ServeError
from llava_serve.web.config import WebConfig

_CODE_SUFFIX = re.compile(r"\s*\(error_code: \d+\)\s*$")
_STATUS_CODES = {
    401: ErrorCode.INCORRECT_AUTH_KEY,
    403: ErrorCode.NO_PERMISSION,
    429: ErrorCode.RATE_LIMIT,
    503: ErrorCode.CONTROLLER_NO_WORKER,
}


class ControllerClient:
    def __init__(
        self,
        controller_url: str,
        api_key: str | None = None,
        *,
        request_timeout: float = 20.0,
        stream_timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.stream_timeout = stream_timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(request_timeout, connect=min(request_timeout, 5.0))
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def from_config(cls, config: WebConfig) -> ControllerClient:
        return cls(
            config.controller_url,
            config.controller_api_key,
            request_timeout=config.request_timeout,
            stream_timeout=config.stream_timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_models(self) -> list[str]:
        data = await self._post_json(self.controller_url + "/list_models", {}, "the controller")
        models = data.get("models")
        if not isinstance(models, list):
            raise _bad_answer("the controller", "/list_models", data)
        return [str(m) for m in models]

    async def worker_address(self, model: str) -> str:
        url = self.controller_url + "/get_worker_address"
        data = await self._post_json(url, {"model": model}, "the controller")
        address = data.get("address")
        if not isinstance(address, str):
            raise _bad_answer("the controller", "/get_worker_address", data)
        if not address:
            raise NoWorker(f"no worker serves model {model!r} right now; refresh the model list or retry")
        return address.rstrip("/")

    async def build_prompt(self, worker_address: str, messages: list[dict[str, Any]]) -> str:
        url = worker_address + "/worker_build_prompt"
        data = await self._post_json(url, {"messages": messages}, f"the worker {worker_address}")
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise _bad_answer("the worker", "/worker_build_prompt", data)
        return prompt

    async def generate_stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The answer's frames, through the controller's proxy; raises on an error frame.

        Closing this generator (the user pressed stop) closes the HTTP stream, which the
        controller passes on to the worker as a disconnect.
        """
        url = self.controller_url + "/worker_generate_stream"
        what = "the controller"
        try:
            async with self._http.stream("POST", url, json=payload, timeout=self._stream_timeouts()) as resp:
                if resp.status_code != 200:
                    raise http_error(resp.status_code, await resp.aread(), resp.headers, what)
                async for frame in iter_frames(resp.aiter_bytes()):
                    if frame.get("error_code", 0):
                        raise frame_error(frame)
                    yield frame
        except httpx.HTTPError as exc:
            raise transport_error(exc, what, url, self.stream_timeout) from exc
        except ValueError as exc:  # a frame that is not a JSON object
            raise ServeError(
                f"{what} sent an unreadable stream frame: {exc}", code=ErrorCode.GRADIO_STREAM_UNKNOWN_ERROR
            ) from exc

    def _stream_timeouts(self) -> httpx.Timeout:
        connect = self._http.timeout.connect
        return httpx.Timeout(self.stream_timeout, connect=connect)

    async def _post_json(self, url: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            resp = await self._http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(exc, what, url, self._http.timeout.read) from exc
        if resp.status_code != 200:
            raise http_error(resp.status_code, resp.content, resp.headers, what)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise _bad_answer(what, url, resp.text)
        return data


def transport_error(exc: httpx.HTTPError, what: str, url: str, timeout: float | None) -> ServeError:
    """A readable message for a request that got no HTTP answer (or lost it half-way)."""
    if isinstance(exc, httpx.ConnectTimeout):
        message = f"timed out connecting to {what} at {url}; is it running and reachable?"
    elif isinstance(exc, httpx.ConnectError):
        message = f"cannot connect to {what} at {url} ({_reason(exc)}); is it running?"
    elif isinstance(exc, httpx.TimeoutException):
        message = f"{what} sent nothing for {timeout or 0:g} s, so the request was given up"
    elif isinstance(exc, httpx.RemoteProtocolError):
        message = f"{what} closed the connection before the answer was complete ({_reason(exc)})"
    else:
        message = f"the request to {what} at {url} failed: {type(exc).__name__}: {_reason(exc)}"
    return ServeError(message, code=ErrorCode.GRADIO_REQUEST_ERROR)


def http_error(status: int, body: bytes, headers: httpx.Headers, what: str) -> ServeError:
    """A readable error from a non-200 answer, using its FastChat-style body where it has one."""
    text, code = _body_message(body)
    if status == 429:
        retry = headers.get("retry-after")
        wait = f"; try again in {retry} s" if retry else "; try again shortly"
        message = f"{what} is busy (HTTP 429): {text or 'too many requests'}{wait}"
    elif status in (401, 403):
        message = f"{what} refused the request (HTTP {status}): {text}; check --controller-api-key"
    else:
        message = f"{what} answered HTTP {status}: {text or 'no details given'}"
    return _with_code(message, code, _STATUS_CODES.get(status, ErrorCode.GRADIO_REQUEST_ERROR))


def frame_error(frame: dict[str, Any]) -> ServeError:
    text = _CODE_SUFFIX.sub("", str(frame.get("text") or "")).strip()
    return _with_code(
        text or "the model failed without saying why",
        frame.get("error_code"),
        ErrorCode.GRADIO_STREAM_UNKNOWN_ERROR,
    )


def _with_code(message: str, code: object, default: ErrorCode) -> ServeError:
    try:
        return ServeError(message, code=ErrorCode(int(code)))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        suffix = f" (remote error_code {code})" if code not in (None, "", 0) else ""
        return ServeError(message + suffix, code=default)


def _body_message(body: bytes) -> tuple[str, object]:
    """(message, error_code) from a FastChat `{text, error_code}`, FastAPI `{detail}` or OpenAI body."""
    raw = body.rstrip(b"\0").decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:300], None
    if not isinstance(data, dict):
        return raw[:300], None
    error: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else {}
    text = data.get("text") or data.get("message") or error.get("message") or data.get("detail") or raw
    if not isinstance(text, str):
        text = json.dumps(text)[:300]
    return _CODE_SUFFIX.sub("", text).strip()[:500], data.get("error_code", error.get("code"))


def _reason(exc: BaseException) -> str:
    """The most specific cause: httpx says "All connection attempts failed" over "Connection refused"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno)  # "Connection refused", not asyncio's wording
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def _bad_answer(what: str, route: str, data: object) -> ServeError:
    shown = json.dumps(data)[:200] if not isinstance(data, str) else data[:200]
    message = f"{what} gave an unexpected answer to {route}: {shown}"
    return ServeError(message, code=ErrorCode.GRADIO_REQUEST_ERROR)
