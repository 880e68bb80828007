"""Per-request sampling settings, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from llava_serve.errors import InvalidParameter

GREEDY_TEMPERATURE = 1e-3
# Below this, dividing a logit by the penalty can overflow float32 to inf, and sampling then fails in
# the engine thread (which killed the engine for every request); any real use is >= 0.5.
MIN_REPETITION_PENALTY = 1e-3
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's log-probability and the top k

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidParameter(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise InvalidParameter(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not self.repetition_penalty >= MIN_REPETITION_PENALTY:
            raise InvalidParameter(
                f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}, got {self.repetition_penalty}"
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidParameter(f"seed must fit in 64 bits ({SEED_RANGE[0]}..{SEED_RANGE[1]}), got {self.seed}")
        if self.max_new_tokens < 0:
            raise InvalidParameter(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InvalidParameter("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidParameter(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
