"""Structured output: a grammar the sampled tokens must follow (a JSON schema, or any JSON object).

Built on llguidance (a maintained grammar engine: JSON Schema to a token mask in ~50 us a step). The
matcher is compiled off the engine thread, when the request is checked; the engine masks each row's
logits with it before sampling and feeds it the token sampled. Once the grammar is complete only
EOS is allowed, so the request ends with finish_reason "stop".
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from llava_serve.errors import InvalidParameter

_BITS = torch.arange(32, dtype=torch.int32)
_tokenizers: dict[int, Any] = {}
_lock = threading.Lock()


def llg_tokenizer(tokenizer: Any) -> Any:
    """The llguidance view of a Hugging Face tokenizer, built once per tokenizer."""
    import llguidance.hf

    with _lock:
        key = id(tokenizer)
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.hf.from_tokenizer(tokenizer)
        return _tokenizers[key]


# compact JSON, as json.dumps writes it: llguidance otherwise lets a model pad with any whitespace
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_of(spec: dict[str, Any]) -> dict[str, Any]:
    """{"type": "json_object"} or {"type": "json_schema", "schema": {...}} -> the JSON schema to follow."""
    if spec.get("type") == "json_object":
        schema: Any = {"type": "object"}
    else:
        schema = spec.get("schema")
        if spec.get("type") != "json_schema" or not isinstance(schema, dict):
            raise InvalidParameter(
                "response_format is {type: json_object} or {type: json_schema, schema: {...}}", param="response_format"
            )
    return {**schema, "x-guidance": {**LAYOUT, **schema.get("x-guidance", {})}}


class Constraint:
    """One request's grammar state: masks a row of logits, consumes the token sampled from it."""

    def __init__(self, spec: dict[str, Any], tokenizer: Any, param: str = "response_format") -> None:
        """The grammar of `spec`: a response_format ({type: json_object | json_schema}) or, for the
        OpenAI API's guided_regex / guided_choice, {type: regex, pattern}."""
        try:
            import llguidance
            import llguidance.torch
        except ImportError:
            raise InvalidParameter(
                "structured output needs the llguidance package on the worker (pip install llguidance)", param=param
            ) from None
        self._torch = llguidance.torch
        lltok = llg_tokenizer(tokenizer)
        regex = spec.get("pattern") if spec.get("type") == "regex" else None  # guided_regex / guided_choice
        if spec.get("type") == "regex" and (not isinstance(regex, str) or not regex):
            raise InvalidParameter("a regex response_format needs a non-empty pattern", param=param)
        if regex is None:
            grammar = llguidance.grammar_from("json_schema", json.dumps(schema_of(spec)))
        else:
            grammar = llguidance.grammar_from("regex", regex)
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise InvalidParameter(
                f"the {'JSON schema' if regex is None else 'regex'} cannot be used: {error}", param=param
            )
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        self.vocab = lltok.vocab_size
        self.bitmask = self._torch.allocate_token_bitmask(1, self.vocab)

    def mask(self, row: torch.Tensor) -> torch.Tensor:
        """Logits of one row ([vocab] float) with every token the grammar forbids at -inf."""
        self._torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # the bitmask's 32-bit words unpacked here: llguidance's own apply is a TorchScript function
        # that took 0.2-30 ms a call on CPU, this takes tens of microseconds
        allowed = ((self.bitmask[0].unsqueeze(-1) >> _BITS) & 1).bool().flatten()[: self.vocab]
        masked = torch.full_like(row, float("-inf"))  # rows past the tokenizer's vocabulary stay -inf
        masked[: self.vocab] = row[: self.vocab].masked_fill(~allowed.to(row.device), float("-inf"))
        return masked

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
