"""Per-request logits processing and sampling for a decode batch (HF's order of warpers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava_serve.engine.request import Request, TokenLogprobs


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
    """logits: [batch, vocab]; one token per request (its log-probabilities recorded when asked)."""
    if all(_plain(r) for r in requests):
        return logits.argmax(dim=-1).tolist()
    logits = logits.float()
    return [_sample_one(row, req) for row, req in zip(logits, requests)]


def _plain(req: Request) -> bool:
    p = req.params
    return p.greedy and not p.penalized and p.logprobs is None and req.constraint is None


def _sample_one(raw: torch.Tensor, req: Request) -> int:
    p, row = req.params, raw
    if p.repetition_penalty != 1.0:
        row = apply_repetition_penalty(row, req.prompt.input_ids + req.output_ids, p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        row = apply_openai_penalties(row, req.output_ids, p.presence_penalty, p.frequency_penalty)
    if req.constraint is not None:
        row = req.constraint.mask(row)
    if p.greedy:
        token = int(row.argmax())
    else:
        assert req.generator is not None, "a sampling request has its generator from bind()"
        token = sample_row(row, p.temperature, p.top_k, p.top_p, req.generator)
    if req.constraint is not None:
        req.constraint.consume(token)
    if p.logprobs is not None:
        req.token_logprobs.append(token_logprobs(raw, token, p.logprobs))
    return token


def apply_openai_penalties(row: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far: -frequency per occurrence, -presence once."""
    if not generated:
        return row
    ids, counts = torch.tensor(generated, dtype=torch.long, device=row.device).unique(return_counts=True)
    keep = ids < row.shape[-1]
    ids, counts = ids[keep], counts[keep].to(row.dtype)
    return row.index_add(0, ids, -(frequency * counts + presence))


def token_logprobs(raw: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """The sampled token's log-probability under the model (its raw logits, before penalties, grammar
    and temperature, as vLLM and OpenAI report it) and the `top` most likely tokens'."""
    logp = torch.log_softmax(raw.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprobs(token, float(logp[token]), alternatives)


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
