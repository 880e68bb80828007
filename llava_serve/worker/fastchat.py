"""The worker routes only FastChat's clients call: its API server's conversation and embeddings."""

from __future__ import annotations

import base64
import functools
import struct

from fastapi import FastAPI

from llava_serve.errors import ServeError
from llava_serve.models.fastchat_conv import conversation_of
from llava_serve.protocol.worker import (
    ConvTemplateResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    FastChatConversation,
)
from llava_serve.worker.service import WorkerService


class NoFastChatForm(ServeError):
    http_status = 501


def add_fastchat_routes(app: FastAPI, service: WorkerService) -> None:
    # worked out at the first call (rendering probe conversations), then kept: the template does not
    # change while the worker runs
    conversation = functools.cache(lambda: conversation_of(service.lm))

    @app.post("/worker_get_conv_template")
    async def get_conv_template() -> ConvTemplateResponse:
        conv = conversation()
        if conv is None:
            raise NoFastChatForm(
                f"the chat template of {service.lm.name} has no FastChat Conversation form "
                "(see docs/compatibility.md); use /worker_chat_stream, which renders it on the worker"
            )
        return ConvTemplateResponse(conv=FastChatConversation.model_validate(conv.wire()))

    @app.post("/worker_get_embeddings")
    async def get_embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        vectors, token_num = await service.embeddings(body.texts())
        if body.encoding_format == "base64":  # float32 bytes, as FastChat's worker sends them
            packed = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
            return EmbeddingsResponse(embedding=packed, token_num=token_num)
        return EmbeddingsResponse(embedding=vectors, token_num=token_num)
