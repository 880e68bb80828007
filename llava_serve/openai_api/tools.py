"""Function calling for models whose chat template knows nothing of tools (LLaVA's do not).

The tools are described to the model in a system message; a call is a JSON object
`{"name": ..., "arguments": {...}}` as the whole answer. With `tool_choice` "required" or a named
function the answer is constrained to exactly such an object (the worker's grammar, from a JSON
schema built here), so it always parses; with "auto" an answer that is such an object becomes a
tool call and anything else stays text. Earlier calls and tool results go back to the model as text.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llava_serve.errors import InvalidParameter
from llava_serve.protocol.openai import ChatCompletionRequest, ChatMessage, FunctionCall, Tool, ToolCall

INSTRUCTION = (
    "You can call these functions. To call one, answer with only a JSON object "
    '{{"name": <function name>, "arguments": <its arguments as a JSON object>}} and nothing else.\n'
    "Functions: {tools}"
)


class ToolPlan:
    """What a request's tools mean for its prompt, its grammar and the reading of its answer."""

    def __init__(self, req: ChatCompletionRequest) -> None:
        self.tools = {t.function.name: t for t in req.tools or []} if req.tool_choice != "none" else {}
        self.forced = self._forced(req)

    def _forced(self, req: ChatCompletionRequest) -> list[Tool] | None:
        choice = req.tool_choice
        if not self.tools:
            if choice not in (None, "none", "auto"):
                raise InvalidParameter("tool_choice needs tools", param="tool_choice")
            return None
        if choice == "required":
            return list(self.tools.values())
        if choice is not None and not isinstance(choice, str):
            name = choice.function.get("name", "")
            if name not in self.tools:
                raise InvalidParameter(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
            return [self.tools[name]]
        return None

    @property
    def active(self) -> bool:
        return bool(self.tools)

    def system_message(self) -> ChatMessage:
        described = [t.function.model_dump(exclude_none=True) for t in self.tools.values()]
        return ChatMessage(role="system", content=INSTRUCTION.format(tools=json.dumps(described)))

    def grammar(self) -> dict[str, Any] | None:
        """The worker's response_format for a forced call: one of the allowed functions, its arguments."""
        if self.forced is None:
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.forced
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {"type": "json_schema", "schema": schema}

    def read(self, text: str) -> list[ToolCall] | None:
        """The tool calls an answer makes, or None when it is plain text."""
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.tools or not isinstance(obj.get("arguments"), dict):
            return None
        call = FunctionCall(name=obj["name"], arguments=json.dumps(obj["arguments"]))
        return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=call)]


def as_text(msg: ChatMessage) -> ChatMessage:
    """Tool turns for a template without them: a call as the JSON the model would write, a result as
    a user turn that names the call."""
    if msg.role == "tool":
        return ChatMessage(role="user", content=f"Result of call {msg.tool_call_id or ''}: {_text(msg)}")
    if msg.role == "assistant" and msg.tool_calls:
        calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in msg.tool_calls]
        return ChatMessage(role="assistant", content=json.dumps(calls[0] if len(calls) == 1 else calls))
    return msg


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:  # a client's own malformed arguments go back as it sent them
        return text


def _text(msg: ChatMessage) -> str:
    return " ".join(getattr(p, "text", "") for p in msg.parts())
