"""Typed errors shared by every service, each with a FastChat-style error code.

Codes 4xxxx are the client's fault, 5xxxx the server's (FastChat's `ErrorCode` scheme, extended).
Services map these to HTTP responses in one place each; nothing else invents error text.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    VALIDATION_TYPE_ERROR = 40001
    INVALID_IMAGE = 40002
    IMAGE_TOO_LARGE = 40003
    IMAGE_COUNT_MISMATCH = 40004
    REQUEST_TOO_LARGE = 40005
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006
    ENGINE_DEAD = 50007
    WORKER_SHUTTING_DOWN = 50008


class ServeError(Exception):
    """Base class: carries an error code and the HTTP status it maps to."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    http_status: int = 500

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {"text": f"{self.message} (error_code: {int(self.code)})", "error_code": int(self.code)}


class InvalidRequest(ServeError):
    code = ErrorCode.VALIDATION_TYPE_ERROR
    http_status = 400


class InvalidParameter(InvalidRequest):
    code = ErrorCode.PARAM_OUT_OF_RANGE


class ImageError(InvalidRequest):
    code = ErrorCode.INVALID_IMAGE


class ImageTooLarge(ImageError):
    code = ErrorCode.IMAGE_TOO_LARGE
    http_status = 413


class ImageCountMismatch(InvalidRequest):
    code = ErrorCode.IMAGE_COUNT_MISMATCH


class ContextOverflow(InvalidRequest):
    code = ErrorCode.CONTEXT_OVERFLOW


class UnknownModel(InvalidRequest):
    code = ErrorCode.INVALID_MODEL
    http_status = 404


class Unauthorized(ServeError):
    code = ErrorCode.INCORRECT_AUTH_KEY
    http_status = 401


class Overloaded(ServeError):
    code = ErrorCode.ENGINE_OVERLOADED
    http_status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(ServeError):
    code = ErrorCode.WORKER_SHUTTING_DOWN
    http_status = 503


class EngineDead(ServeError):
    code = ErrorCode.ENGINE_DEAD
    http_status = 503


class OutOfMemory(ServeError):
    code = ErrorCode.CUDA_OUT_OF_MEMORY
    http_status = 503


class NoWorker(ServeError):
    code = ErrorCode.CONTROLLER_NO_WORKER
    http_status = 503


class WorkerUnavailable(ServeError):
    """A worker could not be reached, or failed mid-stream."""

    code = ErrorCode.CONTROLLER_WORKER_TIMEOUT
    http_status = 502


class Forbidden(ServeError):
    """A shared secret (e.g. the workers' registration secret) is missing or wrong."""

    code = ErrorCode.NO_PERMISSION
    http_status = 403


class RegistryFull(Overloaded):
    """The controller already holds its --max-workers registrations."""

    code = ErrorCode.RATE_LIMIT


class ModelLoadError(Exception):
    """A checkpoint cannot be loaded; the message says what to fix."""


class RequestTooLarge(InvalidRequest):
    code = ErrorCode.REQUEST_TOO_LARGE
    http_status = 413
