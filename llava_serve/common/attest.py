"""Proof that a worker address holds the registration secret, before it gets any traffic.

The controller sends a fresh random challenge to the address it was asked to register, with its own
MAC of it (so a worker answers only to a controller that holds the secret, and is no oracle for
anyone else). The worker answers with its status and a MAC over the challenge *and its own
configured address*: a rogue address that relays the challenge to a real worker gets a proof for
the real worker's address, which does not match. Nothing else (no worker API key) is sent to an
address before its proof checks out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

ATTEST_PATH = "/worker_attest"
SECRET_ENV = "LLAVA_SERVE_REGISTRATION_SECRET"


def new_challenge() -> str:
    return secrets.token_urlsafe(24)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()  # unit separator


def controller_mac(secret: str, challenge: str) -> str:
    return _mac(secret, "llava-serve controller", challenge)


def worker_proof(secret: str, challenge: str, address: str) -> str:
    return _mac(secret, "llava-serve worker", challenge, address.rstrip("/"))


def macs_equal(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())
