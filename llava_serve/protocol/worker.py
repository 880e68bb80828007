"""Wire models of the worker's HTTP contract (LLaVA / FastChat compatible, SPEC section 3)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length", "abort", "error"]

# Stop strings are matched against the output at every step, on the engine thread every request
# shares: their number and length are capped so that cost stays small (100,000 stops made another
# client's 150-token answer take 29.5 s instead of 0.43 s). OpenAI takes 4.
MAX_STOPS = 32
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 256


class GenerateRequest(BaseModel):
    """Body of /worker_generate_stream and /worker_generate.

    Unknown keys are ignored, as LLaVA's worker ignores them (its clients send `model`).
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str
    images: list[str] | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    max_new_tokens: int = Field(256, ge=0, le=1_000_000)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = None
    echo: bool = True
    ignore_eos: bool = False
    request_id: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOPS}")
        if isinstance(v, list) and any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else []
        return list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WorkerStatus(BaseModel):
    # Bounded: dispatch divides and weights by these (inf broke lottery, a negative queue won every pick).
    model_names: list[str] = Field(max_length=64)
    speed: float = Field(1.0, ge=0.0, le=1e9, allow_inf_nan=False)
    queue_length: int = Field(0, ge=0, le=1_000_000_000)

    @field_validator("model_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not 0 < len(n) <= 256 for n in v):
            raise ValueError("model names must be 1..256 characters")
        return v


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One stream frame: JSON then a NUL byte, as LLaVA's clients split on it."""
    return json.dumps(obj).encode() + b"\0"
