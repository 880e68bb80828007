"""The worker tells the controller whether it is multimodal, as FastChat's workers do at registration."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from llava_serve.protocol.worker import WorkerStatus
from llava_serve.worker.registration import Registrar


@pytest.mark.parametrize("multimodal", [True, False])
def test_registration_carries_the_multimodal_flag(multimodal: bool) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    registrar = Registrar("http://ctrl", "http://w:1", lambda: WorkerStatus(model_names=["m"]), multimodal=multimodal)

    async def post(path: str, body: BaseModel) -> dict[str, Any]:
        sent.append((path, body.model_dump()))
        return {}

    registrar._post = post  # type: ignore[method-assign]
    assert asyncio.run(registrar._register())
    assert sent == [
        (
            "/register_worker",
            {
                "worker_name": "http://w:1",
                "check_heart_beat": True,
                "worker_status": {"model_names": ["m"], "speed": 1.0, "queue_length": 0},
                "multimodal": multimodal,
            },
        )
    ]
