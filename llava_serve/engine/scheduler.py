"""Scheduler: a running batch capped by the concurrency limit and a bounded waiting queue."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llava_serve.engine.request import Request, Status


@dataclass
class Schedule:
    prefill: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, max_running: int, prefill_token_budget: int = 8192) -> None:
        self.max_running = max_running
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        """Everything running decodes; waiting requests join while there is room and budget."""
        plan = Schedule(decode=list(self.running))
        budget = self.prefill_token_budget
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            if plan.prefill and req.prompt_len > budget:
                break
            self.waiting.popleft()
            budget -= req.prompt_len
            req.status = Status.RUNNING
            self.running.append(req)
            plan.prefill.append(req)
        return plan

    def finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def cancelled(self) -> list[Request]:
        return [r for r in (*self.running, *self.waiting) if r.cancelled]
