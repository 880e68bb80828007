"""Wire models of the controller's HTTP contract (LLaVA's routes with LLaVA's meaning, SPEC 4)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llava_serve.protocol.worker import WorkerStatus


class _Lenient(BaseModel):
    """LLaVA/FastChat workers send extra keys now and then; they are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")


class WorkerName(_Lenient):
    worker_name: str = Field(min_length=1, max_length=2048)

    @field_validator("worker_name")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("worker_name must be the worker's http(s) address, e.g. http://host:21002")
        return v.rstrip("/")


class RegisterWorkerRequest(WorkerName):
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None
    multimodal: bool = False  # FastChat's flag: /list_multimodal_models vs /list_language_models


class RegisterWorkerResponse(BaseModel):
    ok: bool = True
    heart_beat_interval: float


class HeartBeatRequest(WorkerName):
    queue_length: int = Field(0, ge=0, le=1_000_000)


class HeartBeatResponse(BaseModel):
    exist: bool


class UnregisterWorkerRequest(WorkerName):
    pass


class UnregisterWorkerResponse(BaseModel):
    exist: bool


class ListModelsResponse(BaseModel):
    models: list[str]


class GetWorkerAddressRequest(_Lenient):
    model: str


class GetWorkerAddressResponse(BaseModel):
    address: str
