"""StepCosts (what a step costs, learnt from the engine's steps) and the chunk sizes it gives the
scheduler: a prompt chunk beside running streams adds at most `slack` of a decode step."""

from __future__ import annotations

from llava_serve.engine.params import SamplingParams
from llava_serve.engine.request import Request
from llava_serve.engine.scheduler import MIN_CHUNK, Scheduler
from llava_serve.engine.step_costs import StepCosts
from llava_serve.models.base import EncodedPrompt


class Rows:
    def move_row(self, src: int, dst: int, length: int) -> None:
        pass

    def use_rows(self, rows: int) -> None:
        pass


def request(prompt_len: int) -> Request:
    return Request(EncodedPrompt(list(range(prompt_len))), SamplingParams(max_new_tokens=4), lambda out: None)


def learnt(decode: float = 0.030, per_token: float = 0.001, per_image: float = 0.0, slack: float = 0.4) -> StepCosts:
    costs = StepCosts(slack=slack)
    for _ in range(5):
        costs.observe_step(8, 0, decode)
        costs.observe_step(8, 10, decode + 10 * per_token)
        if per_image:
            costs.observe_images(1, per_image)
    return costs


def test_nothing_is_known_before_steps_of_both_kinds() -> None:
    costs = StepCosts()
    assert costs.chunk_tokens(8) is None
    costs.observe_step(8, 0, 0.030)
    assert costs.chunk_tokens(8) is None  # no step with a prompt chunk yet
    costs.observe_step(8, 12, 0.042)
    assert costs.chunk_tokens(8) == int(0.4 * 0.030 / 0.001)


def test_a_chunk_fits_in_the_slack_of_a_decode_step() -> None:
    costs = learnt(decode=0.030, per_token=0.001, slack=0.4)
    assert costs.chunk_tokens(8) == 12  # 0.4 * 30 ms / 1 ms
    costs = learnt(decode=0.060, per_token=0.003, slack=0.5)
    assert costs.chunk_tokens(8) == 10
    assert costs.chunk_tokens(9) == 10, "an unseen row count takes the nearest one's estimate"


def test_one_stalled_step_does_not_move_the_estimates() -> None:
    costs = learnt(decode=0.030, per_token=0.001)
    costs.observe_step(8, 0, 0.900)  # the thread tuner, a cache resize, another process
    costs.observe_step(8, 10, 0.900)
    assert costs.decode_seconds(8) == 0.030
    assert costs.chunk_tokens(8) == 12


def test_a_newcomers_images_take_their_time_from_the_allowance() -> None:
    costs = learnt(decode=0.030, per_token=0.001, per_image=0.006)
    assert costs.chunk_tokens(8, newcomers=1) == 6  # (12 - 6 ms) / 1 ms: under MIN_CHUNK, see below
    costs = learnt(decode=0.030, per_token=0.001, per_image=0.020)
    assert costs.chunk_tokens(8, newcomers=1) == 0


def running(sched: Scheduler, n: int) -> list[Request]:
    reqs = [request(5) for _ in range(n)]
    for req in reqs:
        sched.add(req)
    batch = sched.schedule()
    assert batch.prefill == reqs
    for req in reqs:
        req.num_computed = req.prompt_len
        sched.promote(req)
        req.output_ids.append(1)
    return reqs


def test_a_newcomer_beside_streams_is_read_in_chunks_the_costs_allow() -> None:
    costs = learnt(decode=0.030, per_token=0.001, per_image=0.002)
    sched = Scheduler(max_running=16, rows=Rows(), step_tokens=32, max_step_tokens=256, costs=costs)
    running(sched, 8)
    new = request(100)
    sched.add(new)
    batch = sched.schedule()  # it starts: its images cost 2 ms of the 12, so 10 tokens
    assert batch.prefill == [new] and batch.chunks == [10]
    new.num_computed, new.prompt_embeds = 10, object()  # type: ignore[assignment]
    batch = sched.schedule()
    assert batch.chunks == [12], "begun: the whole allowance goes to its tokens (not the 24 of the budget)"


def test_a_newcomer_whose_images_leave_less_than_a_chunk_starts_with_no_tokens() -> None:
    costs = learnt(decode=0.030, per_token=0.001, per_image=0.006)
    assert costs.chunk_tokens(8, newcomers=1) < MIN_CHUNK
    sched = Scheduler(max_running=16, rows=Rows(), step_tokens=32, max_step_tokens=256, costs=costs)
    streams = running(sched, 8)
    new = request(100)
    sched.add(new)
    batch = sched.schedule()
    assert batch.decode == streams and batch.prefill == [new] and batch.chunks == [0]
    assert sched.prefilling == [new] and not sched.waiting
    new.prompt_embeds = object()  # type: ignore[assignment]  # the engine began it this step
    batch = sched.schedule()
    assert batch.prefill == [new] and batch.chunks == [12]


def test_a_crowd_of_newcomers_keeps_the_token_budget() -> None:
    """As many newcomers as running streams (a burst of clients): they are read in large steps so
    they start together; the costs apply to a few newcomers beside many streams."""
    costs = learnt(decode=0.030, per_token=0.001)
    sched = Scheduler(max_running=16, rows=Rows(), step_tokens=32, max_step_tokens=256, costs=costs)
    running(sched, 4)
    for _ in range(4):
        sched.add(request(100))
    batch = sched.schedule()
    assert sum(batch.chunks) == 32 * 4 - 4


def test_each_newcomer_waiting_to_start_adds_an_allowance() -> None:
    costs = learnt(decode=0.030, per_token=0.001)
    sched = Scheduler(max_running=16, rows=Rows(), step_tokens=32, max_step_tokens=256, costs=costs)
    running(sched, 8)
    first, second = request(100), request(100)
    for req in (first, second):
        req.prompt_embeds = object()  # type: ignore[assignment]  # begun: no images this step
        sched.add(req)
    batch = sched.schedule()
    assert sum(batch.chunks) == 2 * 12
