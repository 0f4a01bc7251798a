"""Prefix caching: the cache's named blocks (match, adopt, register, eviction order), and the serving core on the
tiny model reading a shared prefix instead of computing it, with the tokens and log-probabilities of a core that
computes everything."""

from __future__ import annotations

import pytest
import torch

from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from services.format.presets import preset_config
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams
from services.gateway.serving import ServingCore


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache(blocks, prefix_caching=True):
    return PagedLatentCache(preset_config("tiny"), num_blocks=blocks, block_size=16, prefix_caching=prefix_caching)


def _written(cache, tokens):
    """A sequence that holds `tokens` written in the cache, its full blocks named."""
    seq = SequenceBlocks()
    cache.reserve(seq, len(tokens))
    seq.length = len(tokens)
    cache.register(seq, lambda a, b: tokens[a:b])
    return seq


# ---- the cache's blocks ------------------------------------------------------------------------------------
def test_released_full_blocks_stay_findable_until_their_room_is_needed_last_block_first():
    cache = _cache(blocks=5)
    tokens = _ids(50, 1)  # 3 full blocks and 2 tokens
    seq = _written(cache, tokens)
    held = list(seq.blocks)
    cache.release(seq)
    assert cache.free_blocks == 5 and cache.usage() == 0.0  # cached blocks nobody holds count as free
    hit = cache.match(tokens)
    assert hit.blocks == held[:3] and hit.tokens == 48 and hit.unheld == 3
    assert cache.match(tokens[:47]).tokens == 32  # whole blocks only
    assert cache.match([tokens[0] + 1] + tokens[1:]).tokens == 0  # a block's name covers the prefix before it

    other = SequenceBlocks()
    cache.reserve(other, 48)  # 3 blocks: the 2 never named first, then the cached prefix's last block
    assert cache.match(tokens).tokens == 32 and held[2] in other.blocks
    other.length = 48
    cache.reserve(other, 16)
    assert cache.match(tokens).tokens == 16 and cache.free_blocks == 1


def test_adopted_blocks_are_shared_and_freed_only_by_their_last_holder():
    cache = _cache(blocks=6)
    tokens = _ids(40, 2)
    first = _written(cache, tokens)
    hit = cache.match(tokens + [5])
    assert hit.tokens == 32 and hit.unheld == 0  # still held by `first`
    second = SequenceBlocks()
    cache.adopt(second, hit)
    assert second.blocks == first.blocks[:2] and second.length == 32 and second.hashes == first.hashes[:2]
    cache.reserve(second, 10)  # its own positions 32..41: a block of its own
    assert second.blocks[2] not in first.blocks and cache.free_blocks == 6 - 3 - 1
    cache.release(first)
    assert cache.free_blocks == 6 - 3  # the two shared blocks stay held by `second`
    cache.release(second)
    assert cache.free_blocks == 6
    cache.adopt(second, hit)  # parked blocks are taken back
    assert cache.free_blocks == 6 - 2
    with pytest.raises(ValueError, match="empty sequence"):
        cache.adopt(second, hit)


def test_without_prefix_caching_nothing_is_named_or_found():
    cache = _cache(blocks=4, prefix_caching=False)
    tokens = _ids(40, 3)
    seq = _written(cache, tokens)
    cache.release(seq)
    assert cache.match(tokens).tokens == 0 and seq.hashes == [] and cache.free_blocks == 4


# ---- the serving core on the tiny model --------------------------------------------------------------------
def _core(engine, blocks, prefix_caching=True, **kw):
    cache = PagedLatentCache(engine.cfg, num_blocks=blocks, block_size=16, prefix_caching=prefix_caching)
    return ServingCore(engine.model, cache, **kw), cache


def _computed_tokens(core):
    """Counts the prompt tokens each request's prefill chunks carry through the model."""
    counts = {}
    execute = core.runner.execute

    def counting(plan):
        for c in plan.chunks:
            if c.prefill:
                counts[id(c.request)] = counts.get(id(c.request), 0) + len(c.token_ids)
        return execute(plan)

    core.runner.execute = counting
    return counts


def _run(core, prompts, params):
    reqs = [Request(p, params) for p in prompts]
    for r in reqs:
        core.submit(r)
        core.run_until_idle()  # one after the other: each finds what the ones before it cached
    return reqs


def test_a_prompt_that_starts_like_an_earlier_one_computes_only_the_rest_and_gives_the_same_output(engine_tiny):
    shared = _ids(50, 4)
    prompts = [shared + _ids(7, 5), shared + _ids(9, 6), shared + _ids(7, 5)[:3], _ids(64, 7), None]
    prompts[4] = prompts[3]  # a whole prompt of 4 full blocks again: its last token is still computed
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=0)
    core, cache = _core(engine_tiny, blocks=64)
    computed = _computed_tokens(core)
    cached = _run(core, prompts, params)
    plain_core, _ = _core(engine_tiny, blocks=64, prefix_caching=False)
    plain = _run(plain_core, prompts, params)

    assert [r.cached_tokens for r in cached] == [0, 48, 48, 0, 48]
    assert [computed[id(r)] for r in cached] == [57, 59 - 48, 53 - 48, 64, 64 - 48]
    for c, p in zip(cached, plain):
        assert c.output == p.output and c.error is None
        got, want = torch.tensor([lp for lp, _ in c.token_logprobs]), torch.tensor([lp for lp, _ in p.token_logprobs])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert cache.free_blocks == 64  # every block given back (cached ones count as free)


def test_requests_running_at_once_share_the_blocks_of_a_finished_one(engine_tiny):
    shared = _ids(70, 8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    core, cache = _core(engine_tiny, blocks=32)
    (first,) = _run(core, [shared + [3]], params)
    reqs = [Request(shared + _ids(5, 9 + i), params) for i in range(3)]
    for r in reqs:
        core.submit(r)
    core.step()
    shared_blocks = first.seq.blocks  # released: compare through the running ones
    assert all(r.cached_tokens == 64 for r in reqs)
    assert reqs[0].seq.blocks[:4] == reqs[1].seq.blocks[:4] == reqs[2].seq.blocks[:4] and shared_blocks == []
    core.run_until_idle()
    for r in reqs:
        assert r.output == engine_tiny.generate([r.prompt], params)[0].token_ids
    assert cache.free_blocks == 32


def test_prompts_admitted_together_compute_their_shared_start_once(engine_tiny):
    """Four prompts with one 48-token start, submitted at once: all are admitted in the first step, when nothing is
    cached; the first one's chunk takes the step, and the others, at their first chunk, take its blocks (written
    by then) in place of the ones they had reserved."""
    shared = _ids(48, 12)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    core, cache = _core(engine_tiny, blocks=32, max_step_tokens=56)
    computed = _computed_tokens(core)
    reqs = [Request(shared + _ids(6, 13 + i), params) for i in range(4)]
    for r in reqs:
        core.submit(r)
    core.run_until_idle()
    assert [r.cached_tokens for r in reqs] == [0, 48, 48, 48]
    assert [computed[id(r)] for r in reqs] == [54, 6, 6, 6]
    for r in reqs:
        assert r.output == engine_tiny.generate([r.prompt], params)[0].token_ids
    assert cache.free_blocks == 32


def test_a_preempted_request_comes_back_through_its_cached_blocks_with_the_same_tokens(engine_tiny):
    """Three 20 + 60 requests in 128 positions (as the scheduler's preemption test): the newest is preempted when
    the cache fills, and on its way back finds the blocks it had written still cached instead of recomputing
    them; every output equals a core without prefix caching."""
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    prompts = [_ids(20, 10 + i) for i in range(3)]
    outputs, readmitted = [], []
    for prefix_caching in (True, False):
        core, cache = _core(engine_tiny, blocks=8, prefix_caching=prefix_caching)
        cache.adopt = lambda seq, hit, adopt=cache.adopt: (readmitted.append(hit.tokens), adopt(seq, hit))[1]
        reqs = [Request(p, params) for p in prompts]
        for r in reqs:
            core.submit(r)
        core.run_until_idle()
        assert core.scheduler.preemptions >= 1 and cache.free_blocks == 8
        outputs.append([r.output for r in reqs])
        if prefix_caching:
            assert readmitted and min(readmitted) >= 16  # came back with at least a block cached
            assert all(r.cached_tokens == 0 for r in reqs)  # a preempted request's own blocks are not a prompt hit
    assert outputs[0] == outputs[1]


def test_requests_with_different_cache_salts_share_nothing(engine_tiny):
    """vLLM's cache_salt: the salt starts the chain of block names, so a prompt finds only the blocks that requests
    with its own salt wrote (the same salt: as without one)."""
    prompt = _ids(50, 15)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    core, _ = _core(engine_tiny, blocks=32)
    for r in [Request(prompt + [3], params, cache_salt="tenant-a")]:
        core.submit(r)
        core.run_until_idle()
    later = [Request(prompt + [4], params, cache_salt=s) for s in ("tenant-b", None, "tenant-a")]
    for r in later:
        core.submit(r)
        core.run_until_idle()
    assert [r.cached_tokens for r in later] == [0, 0, 48]
    assert later[0].output == later[1].output == later[2].output


def test_score_requests_compute_every_position(engine_tiny):
    """A score needs every position's logits: it never reads cached blocks (and scores as a lone score does)."""
    core, _ = _core(engine_tiny, blocks=32)
    prompt = _ids(40, 11)
    _run(core, [prompt + [9]], SamplingParams(max_tokens=2, ignore_eos=True))
    score = Request(prompt, score_top_k=2)
    core.submit(score)
    core.run_until_idle()
    lone = engine_tiny.score(prompt, top_k=2)
    assert score.cached_tokens == 0 and len(score.scores) == len(prompt)
    assert [s.token_id for s in score.scores] == [s.token_id for s in lone]
    assert [s.logprob for s in score.scores[1:]] == pytest.approx([s.logprob for s in lone[1:]], abs=1e-5)


def test_random_traffic_keeps_the_blocks_accounted_and_the_outputs_unchanged(engine_tiny):
    """Prompts drawn from a few shared starts, of random lengths and max_tokens, some cancelled mid-way, in a cache
    small enough to preempt: after every step each block is held by exactly the sequences that list it, and free
    or cached blocks are held by none; at the end every block is back and each finished request's tokens equal
    a core without prefix caching."""
    rng = torch.Generator().manual_seed(14)
    starts = [_ids(40, 20 + i) for i in range(3)]

    def draw(n):
        return int(torch.randint(0, n, (1,), generator=rng))

    prompts = [starts[draw(3)][: 16 + draw(25)] + _ids(1 + draw(20), 30 + i) for i in range(16)]
    limits = [10 + draw(50) for _ in prompts]
    core, cache = _core(engine_tiny, blocks=8, max_step_tokens=48)
    reqs = [Request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, limits)]
    submitted, steps = 0, 0
    while submitted < len(reqs) or not core.scheduler.idle:
        for _ in range(draw(4)):
            if submitted < len(reqs):
                core.submit(reqs[submitted])
                submitted += 1
        if steps % 13 == 5 and core.scheduler.running:
            core.cancel(core.scheduler.running[draw(len(core.scheduler.running))])
        core.step()
        steps += 1
        held = [0] * cache.num_blocks
        for r in core.scheduler.running:
            for b in r.seq.blocks:
                held[b] += 1
        assert held == cache._holders
        idle = set(cache._free) | {b for b in range(cache.num_blocks) if cache.prefix.is_unheld(b)}
        assert all(held[b] == 0 for b in idle) and len(idle) == cache.free_blocks
    assert cache.free_blocks == 8 and core.scheduler.preemptions > 0
    done = [r for r in reqs if r.finish_reason == "length"]
    cancelled = [r for r in reqs if r.cancelled]
    assert cancelled and len(done) + len(cancelled) == len(reqs) and sum(r.cached_tokens for r in done) > 0
    plain_core, _ = _core(engine_tiny, blocks=64, prefix_caching=False)
    plain = _run(plain_core, [r.prompt for r in done], SamplingParams(max_tokens=60, ignore_eos=True))
    for r, p in zip(done, plain):
        assert r.output == p.output[: len(r.output)]
