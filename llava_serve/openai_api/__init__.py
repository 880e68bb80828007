"""OpenAI-compatible API: routes (HTTP) -> serving (logic) -> protocol (pydantic models)."""
