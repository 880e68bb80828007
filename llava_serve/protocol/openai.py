"""Wire models of the OpenAI-compatible API (the subset of chat completions this server offers)."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llava_serve.protocol.frames import TokenLogprob
from llava_serve.protocol.worker import MAX_NEW_TOKENS

# Sent by some clients; accepted only at a value that asks for nothing (`functions` is the old name of
# `tools`, deprecated by OpenAI: clients that still send it are told to use `tools`).
_UNSUPPORTED_UNLESS_EMPTY = ("functions", "function_call", "logit_bias")
# vLLM's structured-output extensions, in the order a conflict names them
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice")
# what a regular expression must escape to match a string literally (regex syntax of llguidance)
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")


def regex_literal(text: str) -> str:
    """`text` as a regular expression that matches exactly it."""
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _plain_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


ContentPart = TextPart | ImagePart


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def parts(self) -> list[ContentPart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        return list(self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}


class JsonSchemaSpec(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)  # an extension, as vLLM names it
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions (extra_body): one of them, or response_format
    guided_json: dict[str, Any] | str | None = None  # a schema, or its JSON text (vLLM takes both)
    guided_regex: str | None = Field(None, min_length=1, max_length=4096)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not all(v):
            raise ValueError("guided_choice takes non-empty strings")
        return v

    def guided(self) -> dict[str, Any] | None:
        """The worker's response_format for a vLLM-style guided_* field (None: none set); more than
        one, or one with response_format, is a ValueError."""
        asked = [k for k in GUIDED_FIELDS if getattr(self, k) is not None]
        if asked and self.response_format is not None and self.response_format.type != "text":
            asked.append("response_format")
        if len(asked) > 1:
            raise ValueError(f"set one of {', '.join(sorted(asked))}")
        if isinstance(self.guided_json, str):
            try:
                schema = json.loads(self.guided_json)
            except ValueError:
                raise ValueError("guided_json is not valid JSON") from None
            if not isinstance(schema, dict):
                raise ValueError("guided_json is a JSON schema (an object)")
            return {"type": "json_schema", "schema": schema}
        if self.guided_json is not None:
            return {"type": "json_schema", "schema": self.guided_json}
        if self.guided_regex is not None:
            return {"type": "regex", "pattern": self.guided_regex}
        if self.guided_choice is not None:
            return {"type": "regex", "pattern": "|".join(regex_literal(c) for c in self.guided_choice)}
        return None

    def unsupported(self) -> str | None:
        """Name of a parameter this server cannot honour, if the request sets one."""
        extra = self.model_extra or {}
        for name in _UNSUPPORTED_UNLESS_EMPTY:
            if extra.get(name) not in (None, [], {}, "none", "auto"):
                return name
        return None

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives per token (None: no logprobs); top_logprobs needs logprobs, as OpenAI says."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int = 0


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionRequest(BaseModel):
    """Legacy completions: a raw prompt (no chat template). `images` (an extension, image URLs as in
    chat) fill the prompt's `<image>` placeholders in order."""

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[str] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None

    _stop = field_validator("stop")(ChatCompletionRequest._stop_strings.__func__)  # type: ignore[attr-defined]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def unsupported(self) -> str | None:
        extra = self.model_extra or {}
        # structured output is a chat feature here: refused on raw completions rather than ignored
        for name in ("suffix", "logit_bias", "best_of", "response_format", *GUIDED_FIELDS):
            if extra.get(name) not in (None, {}, 1, {"type": "text"}):
                return name
        return None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llava-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
