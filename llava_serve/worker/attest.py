"""The worker's side of the registration status check (see common/attest.py).

Open without the client API key (the controller sends no key before the check), but answered only
to a caller that shows it holds the registration secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from llava_serve.common.attest import ATTEST_PATH, controller_mac, macs_equal, worker_proof
from llava_serve.errors import Forbidden
from llava_serve.protocol.worker import WorkerStatus


class AttestRequest(BaseModel):
    challenge: str = Field(min_length=16, max_length=128)
    controller_mac: str = Field(max_length=128)


def add_attest_route(app: FastAPI, secret: str | None, address: str, status: Callable[[], WorkerStatus]) -> None:
    @app.post(ATTEST_PATH)
    async def attest(body: AttestRequest) -> dict[str, Any]:
        if not secret:
            raise Forbidden("this worker has no registration secret to prove")
        if not macs_equal(body.controller_mac, controller_mac(secret, body.challenge)):
            raise Forbidden("the caller did not show the registration secret")
        return {**status().model_dump(), "proof": worker_proof(secret, body.challenge, address)}
