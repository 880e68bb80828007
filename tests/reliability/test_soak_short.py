"""The soak, short: `python -m llava_serve.tools.soak --minutes 1` (RELIABILITY_SOAK_MINUTES to change it;
the 10-minute run is `python -m llava_serve.tools.soak`, kept out of CI). Every request succeeds, and
RSS, fds and threads of every service stay within the soak's growth limits after the warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import REPO_ROOT
from tests.reliability.helpers import record

MINUTES = float(os.environ.get("RELIABILITY_SOAK_MINUTES", "1"))


@pytest.mark.timeout(int(MINUTES * 60) + 300)
def test_soak(tiny_llava: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = [sys.executable, "-m", "llava_serve.tools.soak", "--minutes", str(MINUTES), "--model-path", str(tiny_llava),
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=MINUTES * 60 + 240)
    summary = json.loads((out / "summary.json").read_text())
    growth = {s: {m: f"{v['start']:g}->{v['end']:g}" for m, v in ms.items()}
              for s, ms in summary["growth_after_warmup"].items()}  # fmt: skip
    record("soak", minutes=MINUTES, requests=summary["requests"], failed=summary["failed"],
           latency=summary["latency"], growth_after_warmup=growth)  # fmt: skip
    assert done.returncode == 0 and summary["passed"], (done.stdout[-2000:], summary["errors"])
    assert summary["failed"] == 0 and summary["requests"] >= 100
    assert len({r["service"] for r in summary["samples"]}) == 4  # controller, two workers, API
    assert min(sum(r["service"] == s for r in summary["samples"]) for s in ("api", "controller")) >= 10
    assert (out / "soak.png").stat().st_size > 10_000
