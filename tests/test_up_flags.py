"""`llava-serve up`: the model flags reach every worker's command line, and a bad combination is
refused before any process starts."""

from __future__ import annotations

import pytest

from llava_serve import up


def worker_argv(argv: list[str]) -> list[str]:
    items = up.plan(up.parser().parse_args(argv))
    return next(cmd for name, cmd, _, _ in items if cmd[0] == "llava_serve.model_worker")


def test_int8_and_the_other_model_flags_reach_the_worker() -> None:
    cmd = worker_argv(["--quantization", "int8", "--device", "cpu", "--trust-remote-code"])
    assert cmd[cmd.index("--quantization") + 1] == "int8"
    assert cmd[cmd.index("--device") + 1] == "cpu"
    assert "--trust-remote-code" in cmd
    assert "--quantization" not in worker_argv([])
    cmd = worker_argv(["--quantization", "int4"])
    assert cmd[cmd.index("--quantization") + 1] == "int4"
    with pytest.raises(SystemExit):  # argparse: not one of int8, int4
        worker_argv(["--quantization", "int2"])


def test_a_bad_flag_combination_is_refused_before_anything_starts(capsys, monkeypatch) -> None:
    started = []
    monkeypatch.setattr(up, "start", lambda *a, **k: started.append(a))
    assert up.main(["--quantization", "int8", "--dtype", "bfloat16"]) == 2
    assert "float32" in capsys.readouterr().err
    assert not started
    with pytest.raises(SystemExit):  # argparse itself: --load-8bit and --quantization are exclusive
        up.main(["--quantization", "int8", "--load-8bit"])
