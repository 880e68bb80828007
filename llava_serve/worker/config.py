"""The worker's configuration: one frozen, validated dataclass, its CLI flags, and the model flags every
command that loads a model shares."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from llava_serve.common.attest import SECRET_ENV
from llava_serve.common.connections import ConnectionLimits, add_connection_args, pop_connection_limits
from llava_serve.models.images import ImageLimits
from llava_serve.models.options import QUANTIZATIONS as QUANTIZATION_CHOICES
from llava_serve.models.options import LoadOptions


@dataclass(frozen=True)
class WorkerConfig:
    host: str = "localhost"
    port: int = 21002
    worker_address: str = ""  # default: http://localhost:<port>
    controller_address: str = "http://localhost:21001"
    model_path: str | None = None  # None: the default model that ships with the package
    model_base: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    quantization: str | None = None  # "int8" / "int4": the batch engine's integer weights (CPU, AVX512-VNNI)
    vision_tower: str | None = None
    conv_template: str | None = None
    trust_remote_code: bool = False
    engine: str = "batch"
    limit_model_concurrency: int = 5
    max_queue: int = 64
    no_register: bool = False
    heart_beat_interval: float = 15.0
    api_key: tuple[str, ...] = ()
    registration_secret: str | None = None
    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_aspect_ratio: float = 32.0
    max_request_pixels: int = 100_000_000
    ready_stall_seconds: float = 60.0
    shutdown_grace: float = 20.0
    feature_cache_size: int = 64
    no_prepack: bool = False
    threads: int = 0  # torch intra-op threads of the engine; 0: the batch engine picks (ThreadTuner)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.limit_model_concurrency < 1:
            raise ValueError("--limit-model-concurrency must be >= 1")
        if self.max_queue < 0:
            raise ValueError("--max-queue must be >= 0")
        if self.engine not in ("batch", "generate"):
            raise ValueError("--engine must be 'batch' or 'generate'")
        if self.quantization not in (None, *QUANTIZATION_CHOICES):
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}")
        flag = f"--quantization {self.quantization}"
        if self.quantization and self.engine != "batch":
            raise ValueError(f"{flag} runs in the batch engine (--engine batch)")
        if self.quantization and (self.load_8bit or self.load_4bit):
            raise ValueError(f"{flag} and --load-8bit/--load-4bit are exclusive; pick one")
        if self.quantization and self.dtype not in (None, "float32"):
            raise ValueError(f"{flag} quantizes from the checkpoint's own weights; drop --dtype (or use float32)")
        if self.quantization and self.device not in ("auto", "cpu"):
            raise ValueError(f"{flag} runs on the CPU (--device cpu)")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if self.heart_beat_interval <= 0:
            raise ValueError("--heart-beat-interval must be > 0")
        if not self.worker_address:
            object.__setattr__(self, "worker_address", f"http://localhost:{self.port}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_count=self.max_images,
            max_aspect_ratio=self.max_image_aspect_ratio,
            max_request_pixels=self.max_request_pixels,
        )

    @property
    def max_body_bytes(self) -> int:
        return self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + 4 * 1024 * 1024

    def load_options(self, model_path: str) -> LoadOptions:
        return LoadOptions(
            model_path=model_path,
            model_base=self.model_base,
            model_name=self.model_name,
            device=self.device,
            dtype=self.dtype,
            load_8bit=self.load_8bit,
            load_4bit=self.load_4bit,
            vision_tower=self.vision_tower,
            conv_template=self.conv_template,
            trust_remote_code=self.trust_remote_code,
        )


# The model-loading flags of add_model_args, as WorkerConfig fields (besides model_path).
MODEL_KEYS = (
    "model_base",
    "model_name",
    "device",
    "dtype",
    "load_8bit",
    "load_4bit",
    "quantization",
    "vision_tower",
    "conv_template",
    "trust_remote_code",
)


def add_model_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """Flags shared by every command that loads a model; several: --model-path may repeat."""
    if several:
        parser.add_argument("--model-path", action="append", default=[], help="checkpoint folder (repeatable)")
    else:
        parser.add_argument("--model-path", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--model-base", default=None, help="base LM for projector-only or LoRA checkpoints")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-8bit", action="store_true")
    quant.add_argument("--load-4bit", action="store_true")
    quant.add_argument(
        "--quantization",
        choices=QUANTIZATION_CHOICES,
        default=None,
        help="int8 (per output channel) or int4 (groups of 32, as llama.cpp's q4_0): the decoder's weights "
        "run by the batch engine's compiled kernels (CPU with AVX512-VNNI; Llama/Mistral/Qwen2 decoders; "
        "docs/models.md)",
    )
    parser.add_argument("--vision-tower", default=None, help="local vision tower folder (original LLaVA)")
    parser.add_argument("--conv-template", default=None, help="override the conversation template")
    parser.add_argument("--trust-remote-code", action="store_true")


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-serve worker", description="LLaVA model worker")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", default="")
    p.add_argument("--controller-address", "--controller", dest="controller_address", default="http://localhost:21001")
    add_model_args(p)
    p.add_argument("--engine", default="batch", choices=["batch", "generate"])
    p.add_argument("--limit-model-concurrency", type=int, default=5)
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait beyond the running ones")
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--heart-beat-interval", type=float, default=15.0)
    p.add_argument("--api-key", action="append", default=[], help="bearer key clients must send (repeatable)")
    p.add_argument(
        "--registration-secret",
        default=os.environ.get(SECRET_ENV) or None,
        help=f"shared secret presented to the controller (default: ${SECRET_ENV})",
    )
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--max-image-aspect-ratio", type=float, default=32.0, help="longer side / shorter side")
    p.add_argument("--max-request-pixels", type=int, default=100_000_000, help="all images of a request together")
    p.add_argument("--ready-stall-seconds", type=float, default=60.0)
    p.add_argument("--shutdown-grace", type=float, default=20.0)
    p.add_argument("--feature-cache-size", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads for the model (default 0: the batch engine times 1, half and all cores "
        "and keeps the fastest, again from time to time)",
    )
    p.add_argument(
        "--no-prepack",
        action="store_true",
        help="CPU float32, batch engine: do not keep oneDNN-prepacked copies of the linear weights "
        "(saves one copy of the weights in memory; batched decoding is then ~2x slower)",
    )
    add_connection_args(p)
    p.add_argument("--log-level", default="info")
    return p


def worker_config(argv: list[str] | None = None) -> WorkerConfig:
    """The config from the command line; a bad combination of flags exits with usage and the reason."""
    parser = worker_parser()
    args = vars(parser.parse_args(argv))
    args["api_key"] = tuple(args["api_key"])
    args["connections"] = pop_connection_limits(args)
    names = {f.name for f in fields(WorkerConfig)}
    try:
        return WorkerConfig(**{k: v for k, v in args.items() if k in names})
    except ValueError as exc:
        parser.error(str(exc))
