"""Per-request logits processing and sampling for a decode batch (HF's order of warpers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava_serve.engine.request import Request


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
    """logits: [batch, vocab]; one token per request."""
    plain = all(r.params.greedy and r.params.repetition_penalty == 1.0 for r in requests)
    if plain:
        return logits.argmax(dim=-1).tolist()
    logits = logits.float()
    tokens: list[int] = []
    for row, req in zip(logits, requests):
        p = req.params
        if p.repetition_penalty != 1.0:
            row = apply_repetition_penalty(row, req.prompt.input_ids + req.output_ids, p.repetition_penalty)
        if p.greedy:
            tokens.append(int(row.argmax()))
        else:
            assert req.generator is not None, "a sampling request has its generator from bind()"
            tokens.append(sample_row(row, p.temperature, p.top_k, p.top_p, req.generator))
    return tokens


def apply_repetition_penalty(row: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=row.device)
    ids = ids[ids < row.shape[-1]]
    scores = row.gather(0, ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return row.scatter(0, ids, scores)


def sample_row(row: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    row = row / temperature
    if 0 < top_k < row.shape[-1]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        cumulative = probs.cumsum(-1)
        drop = cumulative - probs > top_p  # keep the smallest set whose mass reaches top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = row.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
