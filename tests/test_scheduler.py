"""The continuous-batching scheduler: admission control on the paged cache, cancellation, mixed steps."""

from __future__ import annotations

import torch

from services.attention.kv_cache import PagedLatentCache
from services.gateway.sampling import SamplingParams
from services.gateway.scheduler import Request, Scheduler


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _scheduler(engine, blocks, **kw):
    cache = PagedLatentCache(engine.cfg, num_blocks=blocks, block_size=16)
    return Scheduler(engine.model, cache, engine.cfg.eos_token_ids, **kw), cache


def test_full_cache_makes_requests_wait_not_fail(engine_tiny):
    sched, cache = _scheduler(engine_tiny, blocks=4)  # 64 tokens: room for one 20+30 request at a time
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reqs = [Request(_ids(20, i), params) for i in range(3)]
    for r in reqs:
        sched.submit(r)
    sched.step()
    assert len(sched.running) == 1 and sched.num_waiting == 2  # admission control
    sched.run_until_idle()
    assert all(r.finish_reason == "length" and len(r.output) == 30 and r.error is None for r in reqs)
    assert cache.free_blocks == 4
    alone = engine_tiny.generate([reqs[2].prompt], params)[0].token_ids
    assert reqs[2].output == alone  # waiting changed nothing


def test_cancelled_request_frees_its_blocks(engine_tiny):
    sched, cache = _scheduler(engine_tiny, blocks=8)
    events = []
    req = Request(_ids(10, 1), SamplingParams(max_tokens=50, ignore_eos=True), on_event=events.append)
    sched.submit(req)
    sched.step()
    sched.step()
    assert cache.free_blocks < 8 and len(req.output) == 2
    sched.cancel(req)
    sched.step()
    assert cache.free_blocks == 8 and req not in sched.running
    assert len(events) == 2  # no event after the client went away


def test_prefill_is_chunked_and_shares_steps_with_decodes(engine_tiny):
    sched, _ = _scheduler(engine_tiny, blocks=32, max_step_tokens=16)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    short, long = Request(_ids(4, 2), params), Request(_ids(40, 3), params)
    sched.submit(short)
    sched.step()  # short prefills and samples its first token
    sched.submit(long)
    sched.step()  # short decodes while long prefills its first 15-token chunk
    assert len(short.output) == 2 and long.fed == 15 and long.output == []
    sched.run_until_idle()
    for r in (short, long):
        assert r.output == engine_tiny.generate([r.prompt], params)[0].token_ids


def test_failed_step_fails_its_requests_and_the_scheduler_goes_on(engine_tiny):
    sched, cache = _scheduler(engine_tiny, blocks=8)
    real = engine_tiny.model.experts

    class DeadPool:
        def start(self, *args):
            raise RuntimeError("pool gone")

    engine_tiny.model.experts = DeadPool()
    try:
        req = Request(_ids(5, 4), SamplingParams(max_tokens=3))
        sched.submit(req)
        sched.step()
    finally:
        engine_tiny.model.experts = real
    assert isinstance(req.error, RuntimeError) and cache.free_blocks == 8
    ok = Request(_ids(5, 4), SamplingParams(max_tokens=3, ignore_eos=True))
    sched.submit(ok)
    sched.run_until_idle()
    assert len(ok.output) == 3 and ok.error is None


def test_micro_batched_steps_equal_single_batch(engine_tiny):
    """Two micro-batches interleaved layer by layer give the same tokens as one batch."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [_ids(n, 20 + n) for n in (3, 9, 14, 6, 21)]
    outs = []
    for micro in (1, 2, 3):
        sched, _ = _scheduler(engine_tiny, blocks=32, micro_batches=micro)
        reqs = [Request(p, params) for p in prompts]
        for r in reqs:
            sched.submit(r)
        sched.run_until_idle()
        outs.append([r.output for r in reqs])
    assert outs[0] == outs[1] == outs[2]
