"""Typed errors shared by every service, each with a FastChat-style error code.

Codes 4xxxx are the client's fault, 5xxxx the server's (FastChat's `ErrorCode` scheme, extended).
Services map these to HTTP responses in one place each; nothing else invents error text.
"""

from __future__ import annotations

from enum import IntEnum

from llava_serve.protocol.frames import FinishReason, Frame, Usage


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

    def __init__(self, message: str, *, code: ErrorCode | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when one is
        if code is not None:
            self.code = code

    def frame(
        self,
        *,
        finish_reason: FinishReason | None = None,
        partial_text: str | None = None,
        usage: Usage | None = None,
        index: int | None = None,
    ) -> Frame:
        """This error as a worker-protocol frame (also the JSON body of a 4xx/5xx answer)."""
        return Frame.failure(
            int(self.code),
            self.message,
            param=self.param,
            finish_reason=finish_reason,
            partial_text=partial_text,
            usage=usage,
            index=index,
        )


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


class ControllerUnavailable(ServeError):
    """The controller cannot be reached (a client of the cluster says so with a retryable 503)."""

    http_status = 503


_BY_CODE: dict[int, type[ServeError]] = {
    ErrorCode.INVALID_IMAGE: ImageError,
    ErrorCode.IMAGE_TOO_LARGE: ImageTooLarge,
    ErrorCode.IMAGE_COUNT_MISMATCH: ImageCountMismatch,
    ErrorCode.REQUEST_TOO_LARGE: RequestTooLarge,
    ErrorCode.INVALID_MODEL: UnknownModel,
    ErrorCode.PARAM_OUT_OF_RANGE: InvalidParameter,
    ErrorCode.CONTEXT_OVERFLOW: ContextOverflow,
    ErrorCode.INVALID_AUTH_KEY: Unauthorized,
    ErrorCode.INCORRECT_AUTH_KEY: Unauthorized,
    ErrorCode.NO_PERMISSION: Forbidden,
    ErrorCode.CUDA_OUT_OF_MEMORY: OutOfMemory,
    ErrorCode.CONTROLLER_NO_WORKER: NoWorker,
    ErrorCode.CONTROLLER_WORKER_TIMEOUT: WorkerUnavailable,
    ErrorCode.ENGINE_DEAD: EngineDead,
    ErrorCode.WORKER_SHUTTING_DOWN: ShuttingDown,
}


def error_from_code(
    code: int, message: str, *, status: int | None = None, retry_after: float = 1.0, param: str | None = None
) -> ServeError:
    """The typed error for a FastChat `error_code` read back from an answer or a frame."""
    message = message or f"upstream error {code}"
    if code // 100 == 429:
        err: ServeError = Overloaded(message, retry_after=retry_after)
    else:
        client_side = code < 50000 and (status is None or status < 500)
        cls = _BY_CODE.get(code) or (InvalidRequest if client_side else ServeError)
        err = cls(message, code=ErrorCode(code) if code in ErrorCode._value2member_map_ else None)
        if cls is ServeError and status is not None and status >= 500:
            err.http_status = status
    err.param = param
    return err


def error_from_frame(frame: Frame, *, status: int | None = None, retry_after: float = 1.0) -> ServeError:
    code = frame.error_code or int(ErrorCode.INTERNAL_ERROR)
    message = frame.error_message or f"generation ended: {frame.finish_reason}"
    return error_from_code(code, message, status=status, retry_after=retry_after, param=frame.param)
