"""Errors in OpenAI's shape: `openai_error(err)` is the one place a ServeError becomes an OpenAI
error body and status (reading errors back from the cluster is `cluster.client`'s job)."""

from __future__ import annotations

from typing import Any

from llava_serve.errors import ErrorCode, ServeError
from llava_serve.protocol.openai import ErrorInfo, ErrorResponse

_OPENAI_CODES = {
    ErrorCode.INVALID_AUTH_KEY: "invalid_api_key",
    ErrorCode.INCORRECT_AUTH_KEY: "invalid_api_key",
    ErrorCode.INVALID_MODEL: "model_not_found",
    ErrorCode.CONTEXT_OVERFLOW: "context_length_exceeded",
    ErrorCode.RATE_LIMIT: "rate_limit_exceeded",
    ErrorCode.ENGINE_OVERLOADED: "rate_limit_exceeded",
}


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
        param=err.param,
        code=getattr(err, "openai_code", None) or _OPENAI_CODES.get(err.code, err.code.name.lower()),
    )
    return err.http_status, ErrorResponse(error=info).model_dump()


class RouteError(ServeError):
    """An HTTP-level refusal (no such route, method not allowed), in OpenAI's shape."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status
        self.openai_code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
