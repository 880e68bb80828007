"""The status check a worker must pass before it is registered (see common/attest.py)."""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from llava_serve.common.attest import ATTEST_PATH, controller_mac, macs_equal, new_challenge, worker_proof
from llava_serve.errors import Forbidden, WorkerUnavailable
from llava_serve.protocol.worker import WorkerStatus


async def verified_status(probe: httpx.AsyncClient, address: str, secret: str | None) -> WorkerStatus:
    """The status `address` reports about itself, signed when there is a secret.

    `probe` carries no credential: nothing secret goes to an address before it has answered.
    """
    try:
        if secret is None:  # loopback-only mode: the address must at least be a worker that answers
            resp = await probe.post(address + "/worker_get_status")
            resp.raise_for_status()
            return WorkerStatus.model_validate(resp.json())
        challenge = new_challenge()
        body = {"challenge": challenge, "controller_mac": controller_mac(secret, challenge)}
        resp = await probe.post(address + ATTEST_PATH, json=body)
        resp.raise_for_status()
        data = resp.json()
    except (httpx.HTTPError, ValidationError, ValueError) as exc:
        raise WorkerUnavailable(f"worker {address} did not pass its status check: {_short(exc)}") from None
    if not isinstance(data, dict) or not macs_equal(data.pop("proof", None), worker_proof(secret, challenge, address)):
        raise Forbidden(f"worker {address} did not prove that it holds the registration secret")
    try:
        return WorkerStatus.model_validate(data)
    except ValidationError as exc:
        raise WorkerUnavailable(f"worker {address} sent an invalid status: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
