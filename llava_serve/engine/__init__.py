"""The serving engine: requests, scheduler, KV slots, sampler and the loop that owns the model."""

from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request, RequestOutput

__all__ = ["Request", "RequestOutput", "SamplingParams"]
