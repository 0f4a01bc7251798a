"""The in-process engine: attention forms, batched decode, the paged cache, sampling and input checks."""

from __future__ import annotations

import pytest
import torch

from services.attention.batch import SequenceChunk
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from services.errors import CacheFullError, InvalidRequestError
from services.gateway.sampling import SamplingParams
from tests.model_steps import build_step


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _attention_outputs(engine, ids, absorb):
    """Every layer's attention output and the logits for a prefill of `ids[:-4]` then 4 cached decode steps."""
    engine.model.set_absorb(absorb)
    outs, logits = [], []
    originals = [layer.attention.forward for layer in engine.model.layers]
    for layer, original in zip(engine.model.layers, originals):
        layer.attention.forward = lambda *a, _f=original: outs.append(_f(*a)) or outs[-1]
    seq = SequenceBlocks()
    try:
        for chunk in (ids[:-4], *[[t] for t in ids[-4:]]):
            batch = build_step([SequenceChunk(seq, chunk)], engine.cache)
            logits.append(engine.model.forward(batch, engine.cache, all_logits=True))
    finally:
        engine.cache.release(seq)
        for layer, original in zip(engine.model.layers, originals):
            layer.attention.forward = original
        engine.model.set_absorb(True)
    return torch.cat(outs), torch.cat(logits)


def test_absorbed_and_naive_attention_agree(engine_tiny):
    ids = _ids(36, 0)
    attn_a, logits_a = _attention_outputs(engine_tiny, ids, absorb=True)
    attn_n, logits_n = _attention_outputs(engine_tiny, ids, absorb=False)
    assert (attn_a - attn_n).abs().max().item() <= 1e-5
    assert (logits_a.log_softmax(-1) - logits_n.log_softmax(-1)).abs().max().item() <= 1e-4


def test_batched_decode_equals_each_alone(engine_tiny):
    prompts = [_ids(n, seed) for n, seed in ((5, 1), (17, 2), (33, 3), (9, 4))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    together = engine_tiny.generate(prompts, params)
    alone = [engine_tiny.generate([p], params)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert engine_tiny.cache.free_blocks == engine_tiny.cache.num_blocks  # everything released


def test_batched_logits_equal_single(engine_tiny):
    """Mixed step: one sequence prefills while others decode, all at different positions."""
    cache = engine_tiny.cache
    a, b, c = _ids(20, 5), _ids(7, 6), _ids(12, 7)
    seqs = [SequenceBlocks() for _ in range(3)]
    try:
        engine_tiny.model.forward(
            build_step([SequenceChunk(seqs[0], a[:-1]), SequenceChunk(seqs[1], b[:-1])], cache), cache
        )
        mixed = engine_tiny.model.forward(
            build_step(
                [SequenceChunk(seqs[0], a[-1:]), SequenceChunk(seqs[1], b[-1:]), SequenceChunk(seqs[2], c)], cache
            ),
            cache,
        )
    finally:
        for s in seqs:
            cache.release(s)
    for row, ids in enumerate((a, b, c)):
        seq = SequenceBlocks()
        try:
            alone = engine_tiny.model.forward(build_step([SequenceChunk(seq, ids)], cache), cache)[0]
        finally:
            cache.release(seq)
        assert (mixed[row] - alone).abs().max().item() < 1e-4
        # score() over ids + [its top token] reads that token's logprob off the same logits
        top = int(alone.argmax())
        scored = engine_tiny.score(ids + [top], top_k=1)[-1]
        assert scored.top[0][0] == top
        assert abs(scored.logprob - alone.log_softmax(-1)[top].item()) < 1e-4


def test_score_is_consistent_with_generate(engine_tiny):
    prompt = _ids(8, 9)
    gen = engine_tiny.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    scored = engine_tiny.score(prompt + gen.token_ids, top_k=3)
    assert scored[0].logprob is None and scored[0].top == []
    for i, tok in enumerate(gen.token_ids):  # greedy picks the top-1 of the scored distribution
        assert scored[len(prompt) + i].top[0][0] == tok


def test_cache_refuses_when_full(tiny_fp8):
    from services.format.config import ModelConfig

    cache = PagedLatentCache(ModelConfig.from_file(tiny_fp8), num_blocks=2, block_size=4)
    seq = SequenceBlocks()
    cache.reserve(seq, 8)
    assert cache.free_blocks == 0 and not cache.can_fit(SequenceBlocks(), 1)
    with pytest.raises(CacheFullError):
        cache.reserve(SequenceBlocks(), 1)
    cache.release(seq)
    assert cache.free_blocks == 2


def test_seeded_sampling_reproducible_and_distinct(engine_tiny):
    prompt = _ids(6, 10)
    p = lambda seed: SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
    a = engine_tiny.generate([prompt], p(1))[0].token_ids
    b = engine_tiny.generate([prompt, prompt], [p(1), p(2)])
    assert b[0].token_ids == a
    assert b[1].token_ids != a


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], SamplingParams(), "empty"),
        ([5, 1024], SamplingParams(), "outside the vocabulary"),
        ([5, -1], SamplingParams(), "outside the vocabulary"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(top_p=0.0), "top_p"),
        ([5] * 4000, SamplingParams(max_tokens=200), "exceeds the context"),
    ],
)
def test_bad_requests_rejected(engine_tiny, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine_tiny.generate([prompt], params)


@pytest.mark.parametrize("mtp", [False, True])
def test_preempted_requests_recompute_and_generate_the_same_tokens(tiny_fp8, engine_tiny, mtp):
    """Five 24 + 40 requests in a 256-position cache (they need 320): the newest are preempted when decodes find
    the cache full, and come back by writing their prompt and output again. Greedy output equals the run with
    room for all, token for token (and with MTP drafting, whose cache is recomputed too)."""
    from services.gateway.engine import Engine

    prompts = [torch.randint(2, 1024, (24,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(5)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    small = Engine.from_dir(tiny_fp8, cache_tokens=256, block_size=16, mtp=mtp)
    got = [g.token_ids for g in small.generate(prompts, params)]
    assert small.scheduler.preemptions >= 1
    assert got == [g.token_ids for g in engine_tiny.generate(prompts, params)]
    assert small.cache.free_blocks == small.cache.num_blocks


def test_generate_gives_each_prompts_text_piece_by_piece(engine_tiny):
    """`on_text(i, piece)`: each prompt's pieces add up to the decode of its output, and they arrive as the
    batch runs (the two prompts' pieces interleave), not at the end."""
    prompts = [_ids(5, 1), _ids(9, 2)]
    pieces: list[tuple[int, str]] = []
    out = engine_tiny.generate(
        prompts, SamplingParams(max_tokens=24, ignore_eos=True), on_text=lambda i, piece: pieces.append((i, piece))
    )
    for i, generation in enumerate(out):
        assert "".join(p for j, p in pieces if j == i) == engine_tiny.decode(generation.token_ids)
    order = [i for i, _ in pieces]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 4  # interleaved step by step (printed at the end, they would switch once)
