"""deploy/kuberay/rayservice.yaml against the RayService CRD's schema (the subset it uses, vendored in
kuberay_rayservice_v1.schema.json with its source), its serveConfigV2 against Ray Serve's own config
schema, and its app args against ours. No Kubernetes needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from llava_serve.ray.config import AppConfig
from tests.ray.conftest import require_ray

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SCHEMA = json.loads((Path(__file__).parent / "kuberay_rayservice_v1.schema.json").read_text())


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_manifest_is_a_valid_rayservice() -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "rayClusterConfig", "workerGroupSpec"), []),  # a misspelt field
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "1"),  # a string for an int32
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # params are strings
    ],
)
def test_the_schema_catches_mistakes(path: tuple[Any, ...], value: Any) -> None:
    broken = copy.deepcopy(manifest())
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(broken)


@pytest.mark.parametrize("source", ["kuberay", "serve.yaml"])
def test_the_serve_config_is_valid_for_ray_serve_and_for_the_app(source: str) -> None:
    require_ray()
    from ray.serve.schema import ServeDeploySchema

    if source == "kuberay":
        config = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    else:
        config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = [a for a in schema.applications if a.import_path == "llava_serve.ray:app"]
    app = AppConfig.from_dict(application.args)
    assert app.models[0].scaling.max_replicas > app.models[0].scaling.min_replicas
