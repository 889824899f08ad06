"""Scheduler behaviour with fake requests and a fake 'model' that samples token 7."""

from rillm.core.block_manager import BlockManager
from rillm.core.request import RequestStatus
from rillm.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tests.core.fakes import make_request

TOKEN = 7


def make_scheduler(
    num_blocks=64, block_size=4, max_num_seqs=8, budget=64, prefix_caching=True, max_len=512
):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_len), bm)


def step(scheduler: Scheduler) -> SchedulerOutput:
    out = scheduler.schedule()
    sampled = [TOKEN if s.samples else None for s in out.scheduled]
    scheduler.update(out, sampled)
    return out


def run_to_completion(scheduler: Scheduler, max_steps=1000) -> int:
    steps = 0
    while scheduler.num_unfinished and steps < max_steps:
        step(scheduler)
        steps += 1
    assert scheduler.num_unfinished == 0, "requests did not finish"
    return steps


def test_prefill_then_decode_until_max_tokens():
    s = make_scheduler()
    req = make_request(10, max_tokens=3)
    s.add(req)
    out = step(s)
    assert [(x.request, x.num_new_tokens) for x in out.scheduled] == [(req, 10)]
    assert req.output_token_ids == [TOKEN]
    step(s)
    step(s)
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == [TOKEN] * 3
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_long_prompt_is_chunked_beside_running_decodes():
    s = make_scheduler(budget=16, prefix_caching=False)
    short = make_request(4, max_tokens=20)
    s.add(short)
    step(s)
    long = make_request(40, max_tokens=2)
    s.add(long)
    out = step(s)
    assert [(x.request, x.num_new_tokens) for x in out.scheduled] == [(short, 1), (long, 15)]
    assert not out.scheduled[1].samples and long.output_token_ids == []
    out = step(s)
    assert [(x.request, x.num_new_tokens) for x in out.scheduled] == [(short, 1), (long, 15)]
    out = step(s)
    assert [(x.request, x.num_new_tokens) for x in out.scheduled] == [(short, 1), (long, 10)]
    assert out.scheduled[1].samples and long.output_token_ids == [TOKEN]
    assert all(o.num_batched_tokens <= 16 for o in [out])


def test_token_budget_and_max_num_seqs_bound_every_step():
    s = make_scheduler(budget=20, max_num_seqs=3)
    reqs = [make_request(9, max_tokens=5) for _ in range(6)]
    for r in reqs:
        s.add(r)
    while s.num_unfinished:
        out = step(s)
        assert out.num_batched_tokens <= 20
        assert len(s.running) <= 3
    assert all(r.output_token_ids == [TOKEN] * 5 for r in reqs)


def test_preemption_recomputes_without_losing_tokens():
    # 6 blocks of 4 tokens: two requests of 8 prompt + 8 output cannot both finish in place.
    s = make_scheduler(num_blocks=6, block_size=4, prefix_caching=False)
    a, b = make_request(8, max_tokens=8), make_request(8, max_tokens=8)
    s.add(a)
    s.add(b)
    preempted = []
    while s.num_unfinished:
        out = step(s)
        preempted += out.preempted
        used = sum(len(r.block_ids) for r in s.running)
        assert used + s.block_manager.num_free_blocks == 6
    assert preempted, "the cache was too small; someone must have been preempted"
    assert b in preempted  # the newest goes first
    assert a.output_token_ids == [TOKEN] * 8 and b.output_token_ids == [TOKEN] * 8
    assert b.num_preemptions >= 1
    assert s.block_manager.num_free_blocks == 6


def test_preempted_request_resumes_from_its_generated_tokens():
    s = make_scheduler(num_blocks=6, block_size=4, prefix_caching=False)
    a, b = make_request(8, max_tokens=8), make_request(8, max_tokens=8)
    s.add(a)
    s.add(b)
    while not b.num_preemptions:
        step(s)
    generated = list(b.output_token_ids)
    assert b.num_computed_tokens == 0 and b.status is RequestStatus.PREEMPTED
    # When it comes back, it recomputes prompt + generated tokens in one go.
    while b.status is not RequestStatus.RUNNING:
        out = step(s)
    resumed = [x for x in out.scheduled if x.request is b][0]
    assert resumed.num_new_tokens == 8 + len(generated)
    assert b.output_token_ids[: len(generated)] == generated


def test_abort_frees_blocks_at_once_in_any_state():
    s = make_scheduler(budget=8)
    running = make_request(6, max_tokens=50)
    chunked = make_request(30, max_tokens=5)
    waiting = make_request(5, max_tokens=5)
    for r in (running, chunked, waiting):
        s.add(r)
    step(s)
    step(s)
    assert running.status is RequestStatus.RUNNING and chunked.num_computed_tokens > 0
    s.finish([running.request_id, chunked.request_id, waiting.request_id],
             RequestStatus.FINISHED_ABORTED)
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in (running, chunked, waiting))
    assert s.num_unfinished == 0 and not s.running and not s.waiting
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert s.schedule().is_empty


def test_prefix_hit_skips_computed_tokens():
    s = make_scheduler(block_size=4)
    system = list(range(1, 13))  # three full blocks
    first = make_request(system + [40, 41], max_tokens=1)
    s.add(first)
    run_to_completion(s)
    second = make_request(system + [50], max_tokens=1)
    s.add(second)
    out = step(s)
    assert second.num_cached_tokens == 12
    assert out.scheduled[0].num_new_tokens == 1
    assert second.output_token_ids == [TOKEN]


def test_siblings_in_one_step_share_prompt_blocks():
    s = make_scheduler(block_size=4)
    prompt = list(range(1, 18))  # four full blocks + 1
    kids = [make_request(prompt, max_tokens=2) for _ in range(3)]
    for k in kids:
        s.add(k)
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [17, 1, 1]
    assert kids[1].block_ids[:4] == kids[0].block_ids[:4] == kids[2].block_ids[:4]
    s.update(out, [TOKEN] * 3)
    run_to_completion(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_eos_and_stop_token_ids_finish_with_stop():
    s = make_scheduler()
    req = make_request(4, max_tokens=10)
    s.add(req)
    out = s.schedule()
    s.update(out, [0])  # eos id of the fake requests
    assert req.status is RequestStatus.FINISHED_STOPPED and req.stop_reason is None


def test_every_block_returns_after_a_mixed_workload():
    s = make_scheduler(num_blocks=20, block_size=4, budget=24, max_num_seqs=4)
    reqs = [make_request(3 + 5 * i, max_tokens=2 + i) for i in range(10)]
    for r in reqs:
        s.add(r)
    for _ in range(3):
        step(s)
    s.finish([reqs[0].request_id, reqs[5].request_id], RequestStatus.FINISHED_ABORTED)
    run_to_completion(s)
    assert s.block_manager.num_free_blocks == 20
    for r in reqs:
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == r.max_tokens
