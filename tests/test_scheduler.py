"""The scheduler plans steps without a model (admission on the paged cache, decode-first budgets, cancellation,
score requests); the serving core executes its plans on the tiny model (mixed steps, failures, micro-batches)."""

from __future__ import annotations

import pytest
import torch

from services.attention.kv_cache import PagedLatentCache
from services.errors import PoolUnavailableError
from services.format.presets import preset_config
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams
from services.gateway.scheduler import ChunkResult, Scheduler
from services.gateway.serving import ServingCore


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _plain_scheduler(blocks, **kw):
    cache = PagedLatentCache(preset_config("tiny"), num_blocks=blocks, block_size=16)
    return Scheduler(cache, eos_token_ids=(1,), **kw), cache


def _commit_tokens(sched, plan, token=7):
    for c in plan.chunks:  # the positions the runner's batch writes (StepBatch.build advances each sequence)
        c.request.seq.length += len(c.token_ids)
    sched.commit(plan, [ChunkResult(token=token if c.samples else None) for c in plan.chunks])


# ---- the scheduler alone ---------------------------------------------------------------------------------
def test_blocks_are_given_as_decodes_need_them_and_the_newest_is_preempted_when_the_cache_is_full():
    """Three 20 + 60 requests in 128 cache positions: all three run at once (each reserved only its prompt and
    first token); when a decode finds the cache full the newest is preempted, comes back first, writes its prompt
    and output again, and goes on. Every request ends with its 60 tokens and every block is given back."""
    sched, cache = _plain_scheduler(blocks=8)  # 8 x 16 positions
    reqs = [Request(_ids(20, i), SamplingParams(max_tokens=60, ignore_eos=True)) for i in range(3)]
    for r in reqs:
        sched.submit(r)
    plan = sched.plan()
    assert [c.request for c in plan.chunks] == reqs and cache.free_blocks == 8 - 3 * 2
    resumed = []  # (request, its output when preempted, the tokens it wrote on its way back)
    output_at_preemption = {}
    for _ in range(400):
        if not plan:
            break
        for c in plan.chunks:
            if c.prefill and c.request.preemptions:
                resumed.append((c.request, output_at_preemption[id(c.request)], c.token_ids))
        _commit_tokens(sched, plan, token=len(plan.chunks) + 2)
        for r in reqs:
            if r in sched.waiting and r.preemptions and id(r) not in output_at_preemption:
                output_at_preemption[id(r)] = list(r.output)
        plan = sched.plan()
    assert [len(r.output) for r in reqs] == [60, 60, 60] and all(r.finish_reason == "length" for r in reqs)
    assert sched.preemptions >= 1 and reqs[0].preemptions == 0  # the oldest is never the one preempted
    request, output, written = resumed[0]
    assert written == (request.prompt + output)[: len(written)] and request.prompt + output == request.prompt + (
        request.recompute
    )
    assert cache.free_blocks == 8 and sched.idle


def test_a_full_cache_waits_for_blocks_before_admitting():
    sched, cache = _plain_scheduler(blocks=4)  # 64 positions
    first, second = (Request(_ids(40, i), SamplingParams(max_tokens=20, ignore_eos=True)) for i in range(2))
    sched.submit(first)
    sched.submit(second)
    plan = sched.plan()
    assert [c.request for c in plan.chunks] == [first] and sched.num_waiting == 1  # 3 blocks + 1 to spare: no room
    for _ in range(21):
        _commit_tokens(sched, plan)
        plan = sched.plan()
    assert first.finish_reason == "length" and [c.request for c in plan.chunks] == [second]


def test_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    sched, _ = _plain_scheduler(blocks=32, max_step_tokens=16, max_decode_stall=0)  # the token budget alone
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    short, long = Request(_ids(4, 2), params), Request(_ids(40, 3), params)
    sched.submit(short)
    _commit_tokens(sched, sched.plan())  # short prefills and samples its first token
    sched.submit(long)
    plan = sched.plan()
    assert [(c.request, len(c.token_ids)) for c in plan.chunks] == [(short, 1), (long, 15)]
    assert not plan.chunks[1].samples  # a mid-prompt chunk samples nothing
    _commit_tokens(sched, plan)
    assert len(short.output) == 2 and long.fed == 15 and long.output == []


def test_prefill_beside_decodes_is_held_to_the_decode_stall_bound_by_measured_step_times():
    sched, _ = _plain_scheduler(blocks=160, max_step_tokens=512, max_decode_stall=4.0)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    short, long = Request(_ids(4, 2), params), Request(_ids(2000, 3), params)
    sched.submit(short)
    plan = sched.plan()
    sched.observe(plan, 0.5)  # a lone prefill (no decodes) tells nothing
    _commit_tokens(sched, plan)
    sched.submit(long)
    plan = sched.plan()  # no decode-only step timed yet: the decode runs alone to time it
    assert [(c.request, len(c.token_ids)) for c in plan.chunks] == [(short, 1)]
    sched.observe(plan, 0.010)
    _commit_tokens(sched, plan)
    plan = sched.plan()  # until measured, 1/16 of the step budget beside decodes
    assert [(c.request, len(c.token_ids)) for c in plan.chunks] == [(short, 1), (long, 32)]
    # prefill costs 5 ms a token: 30 ms allowed over the decode, aimed at 80% of it (24 ms) -> 4 tokens
    sched.observe(plan, 0.010 + 32 * 0.005)
    _commit_tokens(sched, plan)
    plan = sched.plan()
    assert [(c.request, len(c.token_ids)) for c in plan.chunks] == [(short, 1), (long, 4)]
    sched.observe(plan, 0.010 + 4 * 0.0001)  # cheap tokens: grows, at most 2x a step
    _commit_tokens(sched, plan)
    assert [len(c.token_ids) for c in sched.plan().chunks] == [1, 8]
    for _ in range(len(short.output), 50):  # the decode finishes; the prompt alone takes the whole budget again
        _commit_tokens(sched, sched.plan())
    assert short.done and [len(c.token_ids) for c in sched.plan().chunks] == [512]


def test_a_burst_of_prompts_beside_few_decodes_gets_the_bound_times_their_ratio():
    """8 prompts arriving while 1 request decodes: the allowed prefill grows 8x (a burst is not fed a few prompts a
    step for as many steps); 2 decoding -> 4x; fewer prompting than decoding -> the bound itself."""
    sched, _ = _plain_scheduler(blocks=400, max_step_tokens=2048, max_decode_stall=4.0)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    first = Request(_ids(4, 2), params)
    sched.submit(first)
    _commit_tokens(sched, sched.plan())  # its prefill, alone
    plan = sched.plan()
    sched.observe(plan, 0.010)  # a decode-only step: 10 ms
    _commit_tokens(sched, plan)
    burst = [Request(_ids(100, 3 + i), params) for i in range(8)]
    for r in burst:
        sched.submit(r)
    plan = sched.plan()  # until measured, 1/16 of the budget (128 tokens) per prompting request per decoding one
    assert [len(c.token_ids) for c in plan.chunks] == [1, 100, 100, 100, 100, 100, 100, 100, 100]
    sched.observe(plan, 0.010 + 800 * 0.0001)  # 0.1 ms a token, 80 ms added at 8x: 24 ms allowed at 1x -> 240
    _commit_tokens(sched, plan)
    assert all(not r.prefilling for r in burst)
    late = [Request(_ids(600, 20 + i), params) for i in range(2)]
    for r in late:
        sched.submit(r)
    plan = sched.plan()  # 9 decoding, 2 prompting: the bound itself, 240 tokens
    assert [len(c.token_ids) for c in plan.chunks] == [1] * 9 + [240]


def test_short_prompts_go_before_a_long_one_and_only_they_grow_the_bound():
    """Beside a decode, a long prompt (admitted first) and two that fit whole in the bound's 128 tokens: the short
    ones are fed first, and the allowance is 2 x 128 (two short prompts per decoding request); eight long prompts
    alone would not grow it."""
    sched, _ = _plain_scheduler(blocks=600, max_step_tokens=2048, max_decode_stall=4.0)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    first = Request(_ids(4, 2), params)
    sched.submit(first)
    _commit_tokens(sched, sched.plan())
    plan = sched.plan()
    sched.observe(plan, 0.010)
    _commit_tokens(sched, plan)
    long, short = Request(_ids(1000, 3), params), [Request(_ids(100, 4 + i), params) for i in range(2)]
    for r in (long, *short):
        sched.submit(r)
    plan = sched.plan()
    assert [(c.request, len(c.token_ids)) for c in plan.chunks] == [(first, 1), *((r, 100) for r in short), (long, 56)]
    sched.observe(plan, 0.010 + 256 * 0.0001)  # 24 ms allowed at 1x, 25.6 ms added at 2x: 240 tokens
    _commit_tokens(sched, plan)
    more_long = [Request(_ids(1000, 10 + i), params) for i in range(6)]
    for r in more_long:
        sched.submit(r)
    plan = sched.plan()  # 3 decoding, 7 long prompts: the bound itself
    assert [len(c.token_ids) for c in plan.chunks] == [1, 1, 1, 240]


def test_decode_stall_bound_off_gives_prefill_what_the_decodes_leave():
    sched, _ = _plain_scheduler(blocks=64, max_step_tokens=64, max_decode_stall=0)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    short, long = Request(_ids(4, 2), params), Request(_ids(200, 3), params)
    sched.submit(short)
    _commit_tokens(sched, sched.plan())
    sched.submit(long)
    plan = sched.plan()
    sched.observe(plan, 10.0)  # ignored when off
    _commit_tokens(sched, plan)
    assert [len(c.token_ids) for c in plan.chunks] == [1, 63]
    assert [len(c.token_ids) for c in sched.plan().chunks] == [1, 63]


def test_cancelled_request_frees_its_blocks_and_gets_no_more_events():
    sched, cache = _plain_scheduler(blocks=8)
    events = []
    req = Request(_ids(10, 1), SamplingParams(max_tokens=50, ignore_eos=True), on_event=events.append)
    sched.submit(req)
    _commit_tokens(sched, sched.plan())
    _commit_tokens(sched, sched.plan())
    assert cache.free_blocks < 8 and len(req.output) == 2 and len(events) == 2
    sched.cancel(req)
    assert not sched.plan()
    assert cache.free_blocks == 8 and req not in sched.running and len(events) == 2


def test_stop_token_and_eos_finish_with_stop():
    sched, cache = _plain_scheduler(blocks=8)
    stop = Request(_ids(3, 1), SamplingParams(max_tokens=9, stop_token_ids=(5,)))
    eos = Request(_ids(3, 2), SamplingParams(max_tokens=9))
    sched.submit(stop)
    sched.submit(eos)
    plan = sched.plan()
    sched.commit(plan, [ChunkResult(token=5), ChunkResult(token=1)])
    assert stop.finish_reason == eos.finish_reason == "stop" and cache.free_blocks == 8


def test_closed_scheduler_fails_everything_and_refuses_new_requests():
    sched, cache = _plain_scheduler(blocks=4)
    running, waiting = (Request(_ids(20, i), SamplingParams(max_tokens=30)) for i in range(2))
    sched.submit(running)
    sched.submit(waiting)
    sched.plan()
    sched.close(RuntimeError("loop died"))
    assert isinstance(running.error, RuntimeError) and isinstance(waiting.error, RuntimeError)
    assert cache.free_blocks == 4
    with pytest.raises(PoolUnavailableError, match="loop died"):
        sched.submit(Request(_ids(3, 3)))


# ---- the serving core: plans executed on the tiny model --------------------------------------------------
def _core(engine, blocks, **kw):
    cache = PagedLatentCache(engine.cfg, num_blocks=blocks, block_size=16)
    return ServingCore(engine.model, cache, **kw), cache


def test_waiting_changes_no_output(engine_tiny):
    core, cache = _core(engine_tiny, blocks=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reqs = [Request(_ids(20, i), params) for i in range(3)]
    for r in reqs:
        core.submit(r)
    core.run_until_idle()
    assert all(r.finish_reason == "length" and len(r.output) == 30 and r.error is None for r in reqs)
    assert cache.free_blocks == 4
    assert reqs[2].output == engine_tiny.generate([reqs[2].prompt], params)[0].token_ids


def test_chunked_prefill_beside_decodes_gives_the_same_tokens(engine_tiny):
    core, _ = _core(engine_tiny, blocks=32, max_step_tokens=16)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    short, long = Request(_ids(4, 2), params), Request(_ids(40, 3), params)
    core.submit(short)
    core.step()
    core.submit(long)
    core.run_until_idle()
    for r in (short, long):
        assert r.output == engine_tiny.generate([r.prompt], params)[0].token_ids


def test_failed_step_fails_its_requests_and_serving_goes_on(engine_tiny):
    core, cache = _core(engine_tiny, blocks=8)
    real = engine_tiny.model.experts

    class DeadPool:
        def start(self, *args):
            raise RuntimeError("pool gone")

    engine_tiny.model.experts = DeadPool()
    try:
        req = Request(_ids(5, 4), SamplingParams(max_tokens=3))
        core.submit(req)
        core.step()
    finally:
        engine_tiny.model.experts = real
    assert isinstance(req.error, RuntimeError) and cache.free_blocks == 8
    ok = Request(_ids(5, 4), SamplingParams(max_tokens=3, ignore_eos=True))
    core.submit(ok)
    core.run_until_idle()
    assert len(ok.output) == 3 and ok.error is None


def test_micro_batched_steps_equal_single_batch(engine_tiny):
    """Two or three micro-batches interleaved layer by layer give the same tokens as one batch."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [_ids(n, 20 + n) for n in (3, 9, 14, 6, 21)]
    outs = []
    for micro in (1, 2, 3):
        core, _ = _core(engine_tiny, blocks=32, micro_batches=micro)
        reqs = [Request(p, params) for p in prompts]
        for r in reqs:
            core.submit(r)
        core.run_until_idle()
        outs.append([r.output for r in reqs])
    assert outs[0] == outs[1] == outs[2]


def test_score_waits_for_cache_like_generate_and_matches_a_lone_score(engine_tiny):
    """Score goes through admission: with the cache full it waits (it used to fail with RESOURCE_EXHAUSTED)."""
    core, cache = _core(engine_tiny, blocks=4, max_step_tokens=16)
    gen = Request(_ids(20, 1), SamplingParams(max_tokens=30, ignore_eos=True))
    score = Request(_ids(40, 2), score_top_k=3)
    core.submit(gen)
    core.submit(score)
    core.step()
    assert score in core.scheduler.waiting
    core.run_until_idle()
    assert score.finish_reason == "scored" and len(score.scores) == 40 and score.scores[0].logprob is None
    alone = engine_tiny.score(score.prompt, top_k=3)
    for mine, ref in zip(score.scores[1:], alone[1:]):  # chunked (16 tokens a step) against one 40-token step
        assert mine.token_id == ref.token_id and abs(mine.logprob - ref.logprob) < 1e-4
        assert [t for t, _ in mine.top] == [t for t, _ in ref.top]
    assert cache.free_blocks == 4
