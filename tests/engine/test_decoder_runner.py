"""The decoder runner against the transformers model it was built from: Llama, Mistral, Qwen2.

Logits are compared at every position a request is sampled at, through the real engine step
(scheduler, chunked prefill, rows joining and leaving, row moves), and greedy tokens against
`model.generate`; configs the runner does not handle go to the transformers path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llava_serve.engine.decoder import decode_attention
from llava_serve.engine.decoder_runner import DecoderRunner
from llava_serve.engine.engine import BatchEngine
from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request
from llava_serve.engine.runner import HFRunner
from llava_serve.engine.scheduler import MIN_CHUNK
from llava_serve.engine.step_costs import StepCosts
from llava_serve.errors import ModelLoadError
from llava_serve.models.base import EncodedPrompt, LoadedModel
from llava_serve.models.hf import wrap_hf_model
from llava_serve.tools.checkpoints.hf import SIZES, _randomize, build_tokenizer, text_config

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(SIZES["tiny"].vocab)


def tiny_lm(tokenizer, family: str, **overrides) -> LoadedModel:
    config_class, model_class = FAMILIES[family]
    config = text_config(SIZES["tiny"], len(tokenizer), tokenizer, config_class)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = model_class(config)
    _randomize(model, seed=3)
    model.eval()
    return wrap_hf_model(model, tokenizer, None, f"tiny-{family}")


def prompts(n: int, base: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(5, 400, (base + 7 * i,), generator=gen).tolist() for i in range(n)]


def request(ids: list[int], tokens: int) -> Request:
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    return Request(prompt=EncodedPrompt(input_ids=list(ids)), params=params, sink=lambda out: None)


shapes: list[tuple[int, int]] = []  # (decode rows, prompts) of each step of the last drive()


def drive(eng: BatchEngine, arrivals: dict[int, list[Request]]) -> list[tuple[Request, int, torch.Tensor]]:
    """Step the engine in this thread; requests join at the given steps. Returns (request, position,
    logits) for every sampled row."""
    seen: list[tuple[Request, int, torch.Tensor]] = []
    shapes.clear()
    run = eng.runner.run

    def recording_run(batch):
        logits = run(batch)
        rows = [(r, r.kv_len) for r in batch.decode]
        rows += [(r, r.prompt_len - 1) for r in batch.prefill if r.prefilled]
        shapes.append((len(batch.decode), len(batch.prefill)))
        seen.extend((req, pos, row.clone()) for (req, pos), row in zip(rows, logits, strict=True))
        return logits

    eng.runner.run = recording_run  # type: ignore[method-assign]
    step = 0
    with torch.inference_mode():  # as in the engine's thread
        while step <= max(arrivals) or eng.scheduler.has_work():
            for req in arrivals.get(step, []):
                eng.submit(req)
            eng._drain(block=False)
            eng.step()
            step += 1
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_with_rows_joining_and_leaving(tokenizer, family):
    lm = tiny_lm(tokenizer, family)
    eng = BatchEngine(lm, max_running=3, max_waiting=8, step_tokens=12, adapt_threads=False, prefix_cache_bytes=0)
    assert isinstance(eng.runner, DecoderRunner)
    ids = prompts(5, base=6)  # 6..34 tokens: the longer ones are read in chunks beside decode rows
    reqs = [request(p, n) for p, n in zip(ids, [9, 4, 12, 6, 7])]
    seen = drive(eng, {0: reqs[:2], 3: reqs[2:4], 6: reqs[4:]})
    assert {id(r) for r, _, _ in seen} == {id(r) for r in reqs}
    assert any(d and p >= 2 for d, p in shapes), "some step reads two prompts beside decode rows"
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)
    assert all(len(r.output_ids) == r.max_tokens for r in reqs)
    assert eng.runner.kv.rows == 0, "the KV storage is freed when the last row leaves"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_equal_generate(tokenizer, family):
    lm = tiny_lm(tokenizer, family)
    eng = BatchEngine(lm, max_running=4, max_waiting=8, step_tokens=16, adapt_threads=False)
    ids = prompts(4, base=10)
    reqs = [request(p, n) for p, n in zip(ids, [14, 8, 11, 5])]
    drive(eng, {0: reqs[:1], 2: reqs[1:3], 5: reqs[3:]})
    for req in reqs:
        with torch.inference_mode():
            out = lm.model.generate(
                torch.tensor([req.prompt.input_ids]),
                max_new_tokens=req.max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert req.output_ids == out[0, req.prompt_len :].tolist()


def test_second_turn_reuses_the_first_turns_kv(tokenizer):
    lm = tiny_lm(tokenizer, "llama")
    eng = BatchEngine(lm, max_running=2, max_waiting=4, adapt_threads=False)
    first = request(prompts(1, base=30)[0], 6)
    drive(eng, {0: [first]})
    turn2_ids = first.prompt.input_ids + first.output_ids + [17, 18, 19]
    second = request(turn2_ids, 5)
    seen = drive(eng, {0: [second]})
    runner = eng.runner
    assert isinstance(runner, DecoderRunner)
    assert runner.prefixes.hits == 1 and runner.prefixes.reused_tokens == first.prompt_len + 5
    with torch.inference_mode():
        full = lm.model(torch.tensor([turn2_ids + second.output_ids])).logits[0]
    for _req, pos, logits in seen:
        torch.testing.assert_close(logits, full[pos], atol=1e-4, rtol=1e-4)


def test_second_turn_reuses_the_answer_it_gets_back_as_text(tokenizer):
    """A random model's answer is bytes and pieces the tokenizer would not produce from its text:
    turn 2 (the answer sent back as text) still reuses all of turn 1, with the answer's own ids,
    and generates what transformers computes for the ids it ran, which render the client's text."""
    lm = tiny_lm(tokenizer, "llama")
    eng = BatchEngine(lm, max_running=2, max_waiting=4, adapt_threads=False)
    first = request(prompts(1, base=30)[0], 24)
    drive(eng, {0: [first]})
    answer = tokenizer.decode(first.output_ids)
    retokenized = tokenizer.encode(answer, add_special_tokens=False)
    assert retokenized != first.output_ids, "the case this test is for: the text does not give the ids back"
    turn2_ids = first.prompt.input_ids + retokenized + [17, 18, 19]
    second = request(turn2_ids, 5)
    seen = drive(eng, {0: [second]})
    runner = eng.runner
    assert isinstance(runner, DecoderRunner)
    ran = second.prompt.input_ids
    assert runner.prefixes.answer_matches == 1
    assert ran[: first.prompt_len + 23] == first.prompt.input_ids + first.output_ids[:23]
    assert tokenizer.decode(ran) == tokenizer.decode(turn2_ids)
    assert runner.prefixes.reused_tokens >= first.prompt_len + 20
    with torch.inference_mode():
        full = lm.model(torch.tensor([ran + second.output_ids])).logits[0]
    for _req, pos, logits in seen:
        torch.testing.assert_close(logits, full[pos], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("family", "overrides", "reason"),
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope type"),
        ("mistral", {"sliding_window": 16}, "sliding window"),
        ("llama", {"hidden_act": "gelu"}, "activation"),
    ],
)
def test_configs_it_does_not_handle_go_to_transformers(tokenizer, family, overrides, reason):
    lm = tiny_lm(tokenizer, family, **overrides)
    eng = BatchEngine(lm, max_running=2, max_waiting=2, adapt_threads=False, prepack=False)
    assert isinstance(eng.runner, HFRunner)
    with pytest.raises(ModelLoadError, match=reason):
        BatchEngine(lm, max_running=2, max_waiting=2, runner="decoder")


def test_the_transformers_path_can_be_forced(tokenizer, monkeypatch):
    lm = tiny_lm(tokenizer, "qwen2")
    monkeypatch.setenv("LLAVA_SERVE_RUNNER", "transformers")
    eng = BatchEngine(lm, max_running=2, max_waiting=2, adapt_threads=False, prepack=False)
    assert isinstance(eng.runner, HFRunner)
    reqs = [request(p, 6) for p in prompts(2)]
    seen = drive(eng, {0: reqs})
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)


def test_bfloat16_prompt_logits_match_transformers(tokenizer):
    lm = tiny_lm(tokenizer, "llama")
    lm.model.to(torch.bfloat16)
    eng = BatchEngine(lm, max_running=2, max_waiting=2, adapt_threads=False)
    assert isinstance(eng.runner, DecoderRunner)
    req = request(prompts(1, base=20)[0], 3)
    seen = drive(eng, {0: [req]})
    with torch.inference_mode():
        full = lm.model(torch.tensor([req.prompt.input_ids + req.output_ids])).logits[0]
    for _req, pos, logits in seen:
        torch.testing.assert_close(logits, full[pos], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_decode_attention_equals_sdpa(dtype, kv_heads):
    """The half-precision decode path (two matmuls, float32 softmax) against SDPA in float32, with
    grouped-query heads and rows of different lengths."""
    gen = torch.Generator().manual_seed(kv_heads)
    b, heads, d, length = 3, 8, 16, 29
    q = torch.randn(b, heads, d, generator=gen).to(dtype)
    keys, values = (torch.randn(b, kv_heads, length, d, generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros(b, 1, 1, length, dtype=dtype)
    mask[0, ..., 20:] = float("-inf")
    mask[2, ..., 5:] = float("-inf")
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys.float(), values.float(), attn_mask=mask.float(), enable_gqa=kv_heads != heads
    ).reshape(b, heads * d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(decode_attention(q, keys, values, mask).float(), expected, atol=tol, rtol=tol)


class FixedCosts(StepCosts):
    """Chunk sizes as the cost rule would give them on a model whose images are slow."""

    def chunk_tokens(self, rows: int, newcomers: int = 0) -> int | None:
        return 0 if newcomers else 3


def test_cost_sized_chunks_and_image_only_steps_match_transformers(tokenizer):
    lm = tiny_lm(tokenizer, "llama")
    eng = BatchEngine(lm, max_running=4, max_waiting=8, step_tokens=32, adapt_threads=False, prefix_cache_bytes=0)
    eng.scheduler.costs = FixedCosts()
    chunks: list[list[int]] = []
    schedule = eng.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch.decode:
            chunks.append(list(batch.chunks))
        return batch

    eng.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    ids = prompts(4, base=20)
    reqs = [request(p, n) for p, n in zip(ids, [16, 14, 9, 6])]
    seen = drive(eng, {0: reqs[:2], 3: reqs[2:3], 9: reqs[3:]})
    assert [0] in chunks, "a newcomer started beside decode rows with no tokens (its images only)"
    assert [MIN_CHUNK] in chunks, "then read in the smallest chunks"
    with torch.inference_mode():
        full = {id(r): lm.model(torch.tensor([r.prompt.input_ids + r.output_ids])).logits[0] for r in reqs}
    for req, pos, logits in seen:
        torch.testing.assert_close(logits, full[id(req)][pos], atol=1e-4, rtol=1e-4)
    assert all(len(r.output_ids) == r.max_tokens for r in reqs)
