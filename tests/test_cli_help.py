"""`llava-serve <command> --help`: the right program name, and no heavy library loaded to print it
(torch, transformers, gradio and ray take seconds to import; help must not wait for them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llava_serve.cli import COMMANDS

HEAVY = ("torch", "transformers", "gradio", "ray")

PROBE = """
import json, sys
from llava_serve.cli import main
try:
    main([*sys.argv[1].split(), "--help"])
except SystemExit:
    pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""
SUBCOMMANDS = ["ray up"]


@pytest.mark.parametrize("command", sorted(COMMANDS) + SUBCOMMANDS)
def test_help_names_the_command_and_loads_nothing_heavy(command: str) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), command], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    usage, loaded = ran.stdout.split("\n", 1)[0], json.loads(ran.stdout.strip().splitlines()[-1])
    assert usage.startswith(f"usage: llava-serve {command}"), usage
    assert loaded == [], f"{command} --help imported {loaded}"


def test_build_model_sizes_match_the_builder() -> None:
    from llava_serve.tools.checkpoints import build, hf

    assert sorted(build.SIZES) == sorted(hf.SIZES)
