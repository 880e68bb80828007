"""The Ray tests: skipped where ray[serve] is not installed, except in CI (CI=true), where a missing
Ray fails the run (as the browser test does): `pip install -e .[test]` brings it."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("CI", "").lower() in ("1", "true")


def require_ray() -> ModuleType:
    try:
        import ray
        import ray.serve
    except ImportError as exc:
        if REQUIRED:
            need = f"CI needs the Ray tests; ray[serve] cannot be imported ({exc}): pip install -e .[ray]"
            raise RuntimeError(need) from exc
        pytest.skip("ray[serve] is not installed (pip install -e .[ray])", allow_module_level=True)
    return ray
