"""StepCosts: what a step costs, learnt from the engine's own steps, to size prompt chunks.

A prompt chunk read beside running streams delays each of their tokens by what the chunk adds to
the step. A fixed token budget cannot keep that delay in proportion: once decode steps got cheap
(compiled calls, int8 weights) a 24-token chunk made a step 2-3x a decode step, while on a slower
model the same chunk was a fraction of one. So the engine times its steps and the scheduler asks
how many prompt tokens fit in `slack` of a decode step of the current batch:

- `decode[rows]`: seconds of a decode-only step with that many rows;
- `per_token`: seconds a prompt token adds to a step with decode rows (the step's time above the
  decode estimate, over its prompt tokens). Chunks carry a fixed overhead
  too; the estimate through zero still settles where a chunk adds `slack` of a step (the next chunk
  is `slack * decode / per_token`: a fixed point at added time = slack * decode, and a stable one);
- `per_image`: seconds the vision tower and embeddings of a newcomer's prompt take (they run in
  the step that starts reading it), taken from the chunk's allowance of that step.

Each estimate is the median of its last few observations.

Nothing is known before the first steps: the scheduler then keeps its token budget.
"""

from __future__ import annotations

import statistics
from collections import deque

SLACK = 0.4  # a chunk may add this share of a decode step to the running streams' tokens
WINDOW = 9  # recent observations kept per estimate; the estimate is their median


class Recent:
    """The median of the last few observations: one step stalled by something else (the thread
    tuner trying a count, a cache resize, another process) does not move it."""

    def __init__(self, size: int = WINDOW) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def value(self) -> float:
        return statistics.median(self.values)


class StepCosts:
    def __init__(self, slack: float = SLACK) -> None:
        self.slack = slack
        self.decode: dict[int, Recent] = {}
        self.per_token = Recent()
        self.per_image = Recent()

    def decode_seconds(self, rows: int) -> float | None:
        """The decode estimate for `rows` rows, or for the nearest row count seen."""
        if not self.decode:
            return None
        nearest = min(self.decode, key=lambda n: (abs(n - rows), n))
        return self.decode[nearest].value

    def observe_step(self, rows: int, prompt_tokens: int, seconds: float) -> None:
        if rows <= 0:
            return
        if prompt_tokens <= 0:
            self.decode.setdefault(rows, Recent()).add(seconds)
            return
        base = self.decode_seconds(rows)
        if base is not None:
            self.per_token.add(max(0.0, seconds - base) / prompt_tokens)

    def observe_images(self, newcomers: int, seconds: float) -> None:
        if newcomers > 0:
            self.per_image.add(seconds / newcomers)

    def chunk_tokens(self, rows: int, newcomers: int = 0) -> int | None:
        """Prompt tokens a step with `rows` decode rows (starting `newcomers` prompts) may read so
        it costs at most (1 + slack) decode steps; None while the costs are not known yet."""
        base = self.decode_seconds(rows)
        if base is None or not self.per_token.values or self.per_token.value <= 0:
            return None
        images = self.per_image.value if self.per_image.values else 0.0
        return max(0, int((self.slack * base - newcomers * images) / self.per_token.value + 1e-6))
