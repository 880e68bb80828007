"""Errors in OpenAI's shape, and the worker/controller's FastChat codes turned back into errors.

`openai_error(err)` is the one place a ServeError becomes an OpenAI error body and status.
"""

from __future__ import annotations

import json
from typing import Any

from llava_serve.errors import (
    ContextOverflow,
    EngineDead,
    ErrorCode,
    ImageCountMismatch,
    ImageError,
    ImageTooLarge,
    InvalidParameter,
    InvalidRequest,
    NoWorker,
    OutOfMemory,
    Overloaded,
    ServeError,
    ShuttingDown,
    Unauthorized,
    UnknownModel,
    WorkerUnavailable,
)
from llava_serve.protocol.openai import ErrorInfo, ErrorResponse


class ControllerUnavailable(ServeError):
    """The API cannot reach the controller."""

    http_status = 503


_BY_CODE: dict[int, type[ServeError]] = {
    ErrorCode.INVALID_IMAGE: ImageError,
    ErrorCode.IMAGE_TOO_LARGE: ImageTooLarge,
    ErrorCode.IMAGE_COUNT_MISMATCH: ImageCountMismatch,
    ErrorCode.INVALID_MODEL: UnknownModel,
    ErrorCode.PARAM_OUT_OF_RANGE: InvalidParameter,
    ErrorCode.CONTEXT_OVERFLOW: ContextOverflow,
    ErrorCode.INVALID_AUTH_KEY: Unauthorized,
    ErrorCode.INCORRECT_AUTH_KEY: Unauthorized,
    ErrorCode.CUDA_OUT_OF_MEMORY: OutOfMemory,
    ErrorCode.CONTROLLER_NO_WORKER: NoWorker,
    ErrorCode.CONTROLLER_WORKER_TIMEOUT: WorkerUnavailable,
    ErrorCode.ENGINE_DEAD: EngineDead,
    ErrorCode.WORKER_SHUTTING_DOWN: ShuttingDown,
}

_OPENAI_CODES = {
    ErrorCode.INVALID_AUTH_KEY: "invalid_api_key",
    ErrorCode.INCORRECT_AUTH_KEY: "invalid_api_key",
    ErrorCode.INVALID_MODEL: "model_not_found",
    ErrorCode.CONTEXT_OVERFLOW: "context_length_exceeded",
    ErrorCode.RATE_LIMIT: "rate_limit_exceeded",
    ErrorCode.ENGINE_OVERLOADED: "rate_limit_exceeded",
}


def with_param(err: ServeError, param: str) -> ServeError:
    """Name the request field at fault (OpenAI's `param`)."""
    err.param = param  # type: ignore[attr-defined]
    return err


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def openai_error(err: ServeError) -> tuple[int, dict[str, Any]]:
    info = ErrorInfo(
        message=err.message,
        type=_error_type(err.http_status),
        param=getattr(err, "param", None),
        code=_OPENAI_CODES.get(err.code, err.code.name.lower()),
    )
    return err.http_status, ErrorResponse(error=info).model_dump()


def error_from_code(code: int, text: str, *, status: int | None = None, retry_after: float = 1.0) -> ServeError:
    """The typed error for a FastChat `error_code` (from a worker or controller answer or frame)."""
    message = text or f"upstream error {code}"
    if code // 100 == 429:
        return Overloaded(message, retry_after=retry_after)
    cls = _BY_CODE.get(code) or (InvalidRequest if code < 50000 else ServeError)
    err = cls(message, code=ErrorCode(code) if code in ErrorCode._value2member_map_ else None)
    if cls is ServeError and status is not None and status >= 500:
        err.http_status = status
    return err


def error_from_response(status: int, body: bytes, headers: Any) -> ServeError:
    """A non-200 answer of the controller or a worker as a typed error."""
    try:
        obj = json.loads(body.rstrip(b"\0"))
        code, text = int(obj["error_code"]), str(obj.get("text", ""))
    except (ValueError, KeyError, TypeError):  # not one of ours: a gateway failure
        return WorkerUnavailable(f"upstream answered HTTP {status}: {body[:200]!r}")
    retry_after = _float(headers.get("retry-after"), 1.0)
    return error_from_code(code, text, status=status, retry_after=retry_after)


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default
