"""Pydantic wire models for the worker, controller and OpenAI-compatible API."""
