"""The Ray Serve application's settings: frozen dataclasses, read from the `args:` of a Serve config
file (or `llava-serve ray up`'s flags), validated before anything starts. Ray is not imported here.

    models:                       # one deployment per model
      - model_path: /models/llava-1.5-7b-hf   # absent: the bundled model
        min_replicas: 1           # autoscaling bounds and target (Serve's autoscaling_config)
        max_replicas: 4
        target_ongoing_requests: 8
        num_cpus: 4               # per replica; torch threads follow it
        limit_model_concurrency: 8  # any worker flag, by its WorkerConfig name
    api: {api_keys: [KEY]}        # the OpenAI API's settings (ApiConfig names)
    ingress: {num_replicas: 1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from llava_serve.openai_api.config import ApiConfig
from llava_serve.worker.config import MODEL_KEYS, WorkerConfig
from llava_serve.worker.loading import resolve_model_path

# Worker flags a model entry may set (the rest are the HTTP server's, which a replica does not run).
WORKER_KEYS = frozenset(
    {
        "model_path",
        *MODEL_KEYS,
        "engine",
        "limit_model_concurrency",
        "threads",
        "max_images",
        "max_image_bytes",
        "max_image_pixels",
        "max_image_aspect_ratio",
        "max_request_pixels",
        "ready_stall_seconds",
        "feature_cache_size",
        "no_prepack",
    }
)
API_KEYS = frozenset(
    {
        "api_keys",
        "max_images_per_request",
        "allow_remote_images",
        "remote_image_timeout",
        "max_image_bytes",
        "max_n",
        "upstream_timeout",
        "max_body_bytes",
    }
)


@dataclass(frozen=True)
class Scaling:
    """Serve's replica count and admission for one model. A replica takes `max_ongoing_requests` at
    once (its engine runs `limit_model_concurrency` of them, the rest wait in the engine's queue);
    beyond that requests wait in Serve's queue, and past `max_queued_requests` they get 429 with
    Retry-After. The autoscaler keeps the average ongoing requests per replica near the target."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float | None = None  # None: the engine's running batch
    max_ongoing_requests: int | None = None  # None: twice the running batch
    max_queued_requests: int = 64
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("replicas: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1 (an unbounded queue is not offered)")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.metrics_interval_s <= 0 or self.look_back_period_s <= 0:
            raise ValueError("metrics_interval_s and look_back_period_s must be > 0")


@dataclass(frozen=True)
class ModelDeployment:
    """One model: its worker settings, its scaling and what each replica asks of a node."""

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scaling: Scaling = field(default_factory=Scaling)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources (pinning)
    graceful_shutdown_timeout_s: float = 20.0
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if self.scaling.max_ongoing_requests is not None and self.scaling.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be >= 1")

    @property
    def name(self) -> str:
        """The model's name, as the worker reports it (--model-name, else the folder's name)."""
        return self.worker.load_options(resolve_model_path(self.worker.model_path)).name

    @property
    def max_ongoing_requests(self) -> int:
        return self.scaling.max_ongoing_requests or 2 * self.worker.limit_model_concurrency

    @property
    def target_ongoing_requests(self) -> float:
        return self.scaling.target_ongoing_requests or float(self.worker.limit_model_concurrency)

    def replica_worker(self) -> WorkerConfig:
        """The worker a replica runs: never registers (Serve is its registry); its engine queue holds
        whatever Serve lets in beyond the running batch, so the engine does not refuse what Serve
        admitted; torch uses the replica's CPUs (Ray also sets OMP_NUM_THREADS to them)."""
        threads = self.worker.threads
        if not threads and self.num_cpus >= 1 and not self.num_gpus:
            threads = math.floor(self.num_cpus)
        return replace(self.worker, no_register=True, max_queue=self.max_ongoing_requests, threads=threads)


@dataclass(frozen=True)
class IngressOptions:
    """The deployment behind Serve's HTTP proxy: the OpenAI API and the worker routes. It holds no
    model, so it needs no CPU of its own; its queue is bounded too (429 + Retry-After past it)."""

    num_replicas: int = 1
    num_cpus: float = 0.0
    max_ongoing_requests: int = 1024
    max_queued_requests: int = 1024
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.max_ongoing_requests < 1 or self.max_queued_requests < 1:
            raise ValueError("ingress: num_replicas, max_ongoing_requests and max_queued_requests must be >= 1")


@dataclass(frozen=True)
class AppConfig:
    models: tuple[ModelDeployment, ...] = (ModelDeployment(),)
    api: ApiConfig = field(default_factory=ApiConfig)
    ingress: IngressOptions = field(default_factory=IngressOptions)
    # How often a request is sent again when its replica dies before the client saw a byte.
    tries: int = 3

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: at least one model")
        if self.tries < 1:
            raise ValueError("tries must be >= 1")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models have the same name ({names}); give one a model_name")

    @classmethod
    def from_dict(cls, args: dict[str, Any] | None) -> AppConfig:
        """From a Serve config file's `args:` (unknown keys are an error that names them)."""
        args = dict(args or {})
        _known(args, {"models", "api", "ingress", "tries"}, "args")
        models = tuple(model_from_dict(m) for m in args.get("models") or [{}])
        api = dict(args.get("api") or {})
        _known(api, API_KEYS, "api")
        if "api_keys" in api:
            api["api_keys"] = tuple(api["api_keys"])
        ingress = dict(args.get("ingress") or {})
        _known(ingress, {f.name for f in fields(IngressOptions)}, "ingress")
        return cls(models=models, api=ApiConfig(**api), ingress=IngressOptions(**ingress), tries=args.get("tries", 3))


REPLICA_KEYS = frozenset({"num_cpus", "num_gpus", "resources", "graceful_shutdown_timeout_s", "health_check_period_s"})
SCALING_KEYS = frozenset(f.name for f in fields(Scaling))


def model_from_dict(entry: dict[str, Any]) -> ModelDeployment:
    """One `models:` entry: worker flags, scaling and replica resources side by side."""
    if not isinstance(entry, dict):
        raise ValueError(f"models: each entry is a mapping, not {entry!r}")
    _known(entry, WORKER_KEYS | SCALING_KEYS | REPLICA_KEYS, "models[]")
    worker = WorkerConfig(**{k: v for k, v in entry.items() if k in WORKER_KEYS})
    scaling = Scaling(**{k: v for k, v in entry.items() if k in SCALING_KEYS})
    replica = {k: v for k, v in entry.items() if k in REPLICA_KEYS}
    return ModelDeployment(worker=worker, scaling=scaling, **replica)


def _known(values: dict[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")
