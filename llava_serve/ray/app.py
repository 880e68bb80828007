"""build_app(config): the Serve application, one deployment per model behind one ingress."""

from __future__ import annotations

import re
from typing import Any

from ray import serve
from ray.serve import Application

from llava_serve.ray.config import AppConfig, ModelDeployment
from llava_serve.ray.ingress import Ingress
from llava_serve.ray.replica import ModelReplica

INGRESS = "Ingress"


def deployment_name(model: str) -> str:
    """`Model-<name>`: what a Serve config file's `deployments:` section overrides by."""
    return "Model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def autoscaling_config(m: ModelDeployment) -> dict[str, Any]:
    s = m.scaling
    config = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": m.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
        "metrics_interval_s": s.metrics_interval_s,
        "look_back_period_s": s.look_back_period_s,
    }
    if s.initial_replicas is not None:
        config["initial_replicas"] = s.initial_replicas
    return config


def model_deployment(m: ModelDeployment) -> Application:
    actor: dict[str, Any] = {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus}
    if m.resources:
        actor["resources"] = dict(m.resources)
    deployment = serve.deployment(
        name=deployment_name(m.name),
        autoscaling_config=autoscaling_config(m),
        max_ongoing_requests=m.max_ongoing_requests,
        max_queued_requests=m.scaling.max_queued_requests,
        ray_actor_options=actor,
        graceful_shutdown_timeout_s=m.graceful_shutdown_timeout_s,
        health_check_period_s=m.health_check_period_s,
    )(ModelReplica)
    return deployment.bind(m.replica_worker())


def build_app(config: AppConfig) -> Application:
    models = {m.name: model_deployment(m) for m in config.models}
    ing = config.ingress
    actor: dict[str, Any] = {"num_cpus": ing.num_cpus}
    if ing.resources:
        actor["resources"] = dict(ing.resources)
    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
        ray_actor_options=actor,
    )(serve.ingress()(Ingress))
    return ingress.bind(config.api, models, config.tries)
