"""The Ray app's settings (no Ray needed): a config file's `args:` and `ray up`'s flags read the same,
mistakes are named, and each replica's worker follows from its deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from llava_serve.ray.config import AppConfig, ModelDeployment, Scaling, model_from_dict
from llava_serve.ray.up import add_up_args, args_from_file, args_of
from llava_serve.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]


def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_up_args(p)
    return p.parse_args(list(argv))


def test_defaults_serve_the_bundled_model_on_one_replica() -> None:
    config = AppConfig.from_dict({})
    (model,) = config.models
    assert model.name == "llava-shapes" and model.scaling.min_replicas == model.scaling.max_replicas == 1
    worker = model.replica_worker()
    assert worker.no_register and worker.threads == 1 and worker.max_queue == model.max_ongoing_requests


def test_a_model_entry_holds_worker_flags_scaling_and_resources(tiny_llava: Path) -> None:
    entry = {"model_path": str(tiny_llava), "limit_model_concurrency": 4, "max_replicas": 3, "num_cpus": 2}
    m = model_from_dict(entry | {"resources": {"gpu_node": 1}})
    assert m.worker.limit_model_concurrency == 4 and m.scaling.max_replicas == 3 and m.resources == {"gpu_node": 1}
    assert m.max_ongoing_requests == 8 and m.target_ongoing_requests == 4.0  # the batch, twice and once
    assert m.replica_worker().threads == 2
    assert model_from_dict(entry | {"num_gpus": 1}).replica_worker().threads == 0  # a GPU replica: the engine picks


def test_mistakes_are_named() -> None:
    with pytest.raises(ValueError, match="modle_path"):
        AppConfig.from_dict({"models": [{"modle_path": "/x"}]})
    with pytest.raises(ValueError, match="unbounded"):
        Scaling(max_queued_requests=0)
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        Scaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="same name"):
        AppConfig(models=(ModelDeployment(), ModelDeployment()))


def test_flags_and_a_config_file_give_the_same_app(tiny_llava: Path, tmp_path: Path) -> None:
    ns = flags("--model-path", str(tiny_llava), "--min-replicas", "1", "--max-replicas", "2", "--api-key", "k")
    args = args_of(ns)
    assert args["models"][0]["max_replicas"] == 2 and args["api"]["api_keys"] == ["k"]
    serve_file = tmp_path / "serve.yaml"
    application = {"name": "llava", "import_path": "llava_serve.ray:app", "args": args}
    serve_file.write_text(yaml.safe_dump({"applications": [application]}))
    assert AppConfig.from_dict(args_from_file(serve_file)) == AppConfig.from_dict(args)
    assert flags("--model-path", "x").max_replicas is None  # no autoscaling unless asked
    assert args_of(flags())["models"][0]["max_replicas"] == 1


def test_the_shipped_serve_config_is_valid() -> None:
    args = args_from_file(ROOT / "deploy" / "ray" / "serve.yaml")
    config = AppConfig.from_dict(args)
    assert config.models[0].scaling.max_replicas > config.models[0].scaling.min_replicas


def test_worker_keys_are_worker_config_fields() -> None:
    from llava_serve.ray.config import WORKER_KEYS

    assert set(WorkerConfig.__dataclass_fields__) >= WORKER_KEYS


def test_ray_up_refuses_a_taken_port_and_a_missing_model_before_starting_ray() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        argv = [sys.executable, "-m", "llava_serve", "ray", "up", "--port", str(taken)]
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and f"port {taken} is in use" in ran.stderr, ran.stderr
    argv = [sys.executable, "-m", "llava_serve", "ray", "up", "--model-path", "/no/such/model"]
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and "/no/such/model: no such folder" in ran.stderr, ran.stderr
