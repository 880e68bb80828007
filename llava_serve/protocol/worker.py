"""Wire models of the worker's HTTP contract (LLaVA / FastChat compatible, SPEC section 3).

Frames (the stream format) live in `protocol/frames.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Stop strings are matched against the output at every step, on the engine thread every request
# shares: their number and length are capped so that cost stays small (100,000 stops made another
# client's 150-token answer take 29.5 s instead of 0.43 s). OpenAI takes 4.
MAX_STOPS = 32
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_NEW_TOKENS = 1_000_000  # the most any route accepts (the API's max_tokens too)


class SamplingFields(BaseModel):
    """What every generation request may set, on every route that generates.

    Unknown keys are ignored, as LLaVA's worker ignores them (its clients send `model`).
    """

    model_config = ConfigDict(extra="ignore")

    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    max_new_tokens: int = Field(default=256, ge=0, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = None
    ignore_eos: bool = False
    request_id: str | None = Field(default=None, max_length=256)
    # extensions, as vLLM names them: OpenAI's penalties, log-probabilities (how many alternatives
    # per token), structured output ({"type": "json_object"} or {"type": "json_schema", "schema": {...}})
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None

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


# FastChat's API server writes an image of a user turn as this, before the turn's text
FASTCHAT_IMAGE = "$$<image>$$"


class GenerateRequest(SamplingFields):
    """Body of /worker_generate_stream and /worker_generate: a prompt built by the client. With
    `n` > 1 (an extension; the OpenAI API's completions use it) frames carry `index`."""

    prompt: str
    images: list[str] | None = None
    echo: bool = True
    n: int = Field(default=1, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _fastchat_images(cls, v: str) -> str:
        return v.replace(FASTCHAT_IMAGE, "<image>\n")  # where LLaVA's templates put an image


class ChatPart(BaseModel):
    """A part of a chat message: text, or the place of the next image of `images`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image"]
    text: str = ""

    @field_validator("type", mode="before")
    @classmethod
    def _image_url_is_image(cls, v: Any) -> Any:
        return "image" if v == "image_url" else v  # OpenAI's name for the part; its URL travels in `images`


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ChatPart]

    def as_message(self) -> dict[str, Any]:
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": [p.model_dump(exclude_defaults=p.type == "image") for p in self.content]}

    def image_count(self) -> int:
        return 0 if isinstance(self.content, str) else sum(p.type == "image" for p in self.content)


class ChatRequest(SamplingFields):
    """Body of /worker_chat_stream: chat messages the worker renders with its own template, the
    images (base64, one per image part, in order) sent once for all `n` choices. Frames carry
    `index` (the choice) and the choice's own text (no echo)."""

    model: str | None = None
    messages: list[ChatTurn] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    n: int = Field(default=1, ge=1, le=16)

    def image_parts(self) -> int:
        return sum(m.image_count() for m in self.messages)


class BuildPromptRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatTurn] = Field(min_length=1)


class BuildPromptResponse(BaseModel):
    prompt: str
    error_code: int = 0


class FastChatConversation(BaseModel):
    """FastChat's `Conversation` as its workers serialise it (fastchat/conversation.py, 0.2.36);
    `sep_style` is the number of FastChat's `SeparatorStyle`."""

    name: str
    system_template: str
    system_message: str
    roles: list[str]
    messages: list[list[str]] = Field(default_factory=list)
    offset: int = 0
    sep_style: int
    sep: str
    sep2: str | None = None
    stop_str: str | None = None
    stop_token_ids: list[int] = Field(default_factory=list)


class ConvTemplateResponse(BaseModel):
    conv: FastChatConversation


class EmbeddingsRequest(BaseModel):
    """Body of /worker_get_embeddings, as FastChat's API server sends it."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingsResponse(BaseModel):
    embedding: list[list[float]] | list[str]  # base64 of float32 when encoding_format is base64
    token_num: int
    error_code: int = 0


class CountTokenResponse(BaseModel):
    count: int
    error_code: int = 0


class ModelDetails(BaseModel):
    context_length: int
    is_multimodal: bool
    model_name: str
    template: str | None = None


class WorkerStatus(BaseModel):
    # Bounded: dispatch divides and weights by these (inf broke lottery, a negative queue won every pick).
    model_names: list[str] = Field(max_length=64)
    speed: float = Field(default=1.0, ge=0.0, le=1e9, allow_inf_nan=False)
    queue_length: int = Field(default=0, ge=0, le=1_000_000_000)

    @field_validator("model_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not 0 < len(n) <= 256 for n in v):
            raise ValueError("model names must be 1..256 characters")
        return v
