"""Attention over a mixed step attends per sequence (decodes batched over their own keys, long chunks alone in
query blocks): the same outputs as each sequence stepped alone, including chunks longer than a query block.
Each test runs through the CPU attention kernel and through torch's path."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_attention
from services.attention import mla
from services.attention.batch import SequenceChunk
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from tests.model_steps import build_step


@pytest.fixture(params=["kernel", "torch"], autouse=True)
def attention_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(mla.cpu_attention, "handles", lambda *a: False)
    elif not cpu_attention.available():
        pytest.skip("no C compiler: no CPU attention kernel")
    return request.param


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_mixed_steps_equal_each_sequence_alone(engine_tiny, monkeypatch):
    monkeypatch.setattr(mla, "QUERY_BLOCK", 8)  # chunks of 9..40 tokens span several query blocks
    model, cfg = engine_tiny.model, engine_tiny.cfg
    cache = PagedLatentCache(cfg, num_blocks=64, block_size=16)
    history = [_ids(n, i) for i, n in enumerate((30, 5, 12, 1, 200))]
    # decodes beside long chunks; 4 prompt tokens at a long context run alone, not padding the decodes to it
    chunks = [_ids(n, 10 + i) for i, n in enumerate((1, 40, 1, 9, 4))]
    seqs = [SequenceBlocks() for _ in history]
    for seq, ids in zip(seqs, history):
        model.forward(build_step([SequenceChunk(seq, ids)], cache), cache)
    mixed = model.forward(
        build_step([SequenceChunk(s, c) for s, c in zip(seqs, chunks)], cache), cache, all_logits=True
    )  # [T, V]
    for s in seqs:
        cache.release(s)
    offset = 0
    for ids, chunk in zip(history, chunks):
        seq = SequenceBlocks()
        model.forward(build_step([SequenceChunk(seq, ids)], cache), cache)
        alone = model.forward(build_step([SequenceChunk(seq, chunk)], cache), cache, all_logits=True)
        cache.release(seq)
        assert (mixed[offset : offset + len(chunk)] - alone).abs().max().item() < 1e-4
        offset += len(chunk)


def test_naive_form_agrees_on_a_mixed_step(engine_tiny, monkeypatch):
    monkeypatch.setattr(mla, "QUERY_BLOCK", 8)
    model, cfg = engine_tiny.model, engine_tiny.cfg
    outs = []
    for absorb in (True, False):
        model.set_absorb(absorb)
        cache = PagedLatentCache(cfg, num_blocks=64, block_size=16)
        a, b = SequenceBlocks(), SequenceBlocks()
        model.forward(build_step([SequenceChunk(a, _ids(20, 1))], cache), cache)
        outs.append(
            model.forward(
                build_step([SequenceChunk(a, [7]), SequenceChunk(b, _ids(33, 2))], cache), cache, all_logits=True
            )
        )
    model.set_absorb(True)
    assert (outs[0].log_softmax(-1) - outs[1].log_softmax(-1)).abs().max().item() < 1e-4


def test_keys_in_consecutive_blocks_are_read_in_place_and_equal_scattered_ones(engine_tiny, monkeypatch):
    """A long chunk whose sequence holds consecutive blocks reads its keys as a view of the cache (no gather);
    the same prompt in scattered blocks is gathered. Both give the same logits."""
    monkeypatch.setattr(mla, "QUERY_BLOCK", 8)
    model, cfg = engine_tiny.model, engine_tiny.cfg
    prompt, chunk = _ids(70, 1), _ids(12, 2)
    outs = []
    for scattered in (False, True):
        cache = PagedLatentCache(cfg, num_blocks=16, block_size=16)
        seq = SequenceBlocks()
        if scattered:
            seq.blocks = [9, 3, 12, 0, 6, 14]  # taken out of the free list by hand: not in order
            cache._free = [b for b in cache._free if b not in seq.blocks]
        first = build_step([SequenceChunk(seq, prompt)], cache)
        second = build_step([SequenceChunk(seq, chunk)], cache)
        assert (second.key_start[0] is None) == scattered and (first.key_start[0] is None) == scattered
        model.forward(first, cache)
        outs.append(model.forward(second, cache, all_logits=True))  # [12, V]
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
