"""The CPU attention kernel (kernels/cpu/latent_attention.c) against a float64 softmax reference over the same
paged cache: decodes, short and long chunks (causal within the chunk), keys scattered over cache blocks, sizes
that leave vector and key-block tails, the few-row (dot) and many-row (transposed) forms, one and two threads;
the MLA layer through the kernel against torch's path; and its argument checks."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_attention
from services.attention import mla
from services.attention.batch import SequenceChunk
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from tests.model_steps import build_step

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler: no CPU attention kernel")


def _case(nh: int, c: int, d: int, chunks: list[tuple[int, int]], seed: int, block: int = 16):
    """chunks: (new tokens, keys) per sequence; each sequence's keys in shuffled blocks of a shared cache."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-keys // block) for _, keys in chunks]
    order = torch.randperm(sum(blocks) + 3, generator=g)  # [blocks]: which cache block holds each
    cache = torch.randn((sum(blocks) + 3) * block, d, generator=g)  # [slots, D]
    width = max(keys for _, keys in chunks)
    key_slots = torch.zeros(len(chunks), width, dtype=torch.int64)  # [B, L]
    used = 0
    for b, (_, keys) in enumerate(chunks):
        mine = order[used : used + blocks[b]]
        used += blocks[b]
        key_slots[b, :keys] = (mine[:, None] * block + torch.arange(block)).flatten()[:keys]
    q_len = torch.tensor([n for n, _ in chunks])
    k_len = torch.tensor([keys for _, keys in chunks])
    q_start = torch.cumsum(q_len, 0) - q_len
    q = torch.randn(int(q_len.sum()), nh, d, generator=g)  # [T, nh, D]
    return q, cache, key_slots, q_start, q_len, k_len


def _reference(q, cache, key_slots, q_start, q_len, k_len, c, scale):
    out = torch.zeros(q.shape[0], q.shape[1], c, dtype=torch.float64)
    for b in range(len(q_len)):
        n, keys, s0 = int(q_len[b]), int(k_len[b]), int(q_start[b])
        rows = cache[key_slots[b, :keys]].double()  # [L, D]
        for j in range(n):
            seen = keys - n + j + 1
            probs = (q[s0 + j].double() @ rows[:seen].T * scale).softmax(-1)  # [nh, seen]
            out[s0 + j] = probs @ rows[:seen, :c]
    return out


@pytest.mark.parametrize(
    "nh, c, d",
    [(4, 64, 80), (3, 20, 27), (16, 32, 48)],  # the tiny preset; tails everywhere; transposed from 2 tokens
)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_a_float64_reference(nh, c, d, threads, monkeypatch):
    monkeypatch.setattr(cpu_attention, "WORK_PER_THREAD", 1)  # as many threads as allowed, even for small work
    torch.set_num_threads(threads)
    try:
        # decodes at 1 and 300 keys, a chunk that is its whole context, a long chunk over many key blocks
        # (a key block is 32 or 64 keys), a token and drafts, a short chunk at a long context
        chunks = [(1, 1), (1, 300), (5, 5), (70, 200), (3, 150), (4, 1000), (1, 64)]
        q, cache, key_slots, q_start, q_len, k_len = _case(nh, c, d, chunks, seed=nh)
        out = cpu_attention.latent_attention(q[..., :c], q[..., c:], cache, key_slots, q_start, q_len, k_len, 0.17)
        ref = _reference(q, cache, key_slots, q_start, q_len, k_len, c, 0.17)
        assert out.shape == (q.shape[0], nh, c)
        assert (out.double() - ref).abs().max().item() < 2e-5
    finally:
        torch.set_num_threads(1)


def test_sharp_scores_do_not_overflow():
    """Scores far apart (a key 60 above the rest, others ~-1e4): the online softmax rescales without inf or NaN."""
    q, cache, key_slots, q_start, q_len, k_len = _case(4, 16, 24, [(2, 130)], seed=3)
    cache[key_slots[0, 100]] *= 30.0
    q = q * 10
    out = cpu_attention.latent_attention(q[..., :16], q[..., 16:], cache, key_slots, q_start, q_len, k_len, 1.0)
    ref = _reference(q, cache, key_slots, q_start, q_len, k_len, 16, 1.0)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() < 1e-3 * ref.abs().max().item()


def test_mla_through_the_kernel_equals_torchs_path(engine_tiny, monkeypatch):
    """One mixed step (decodes, a long chunk, a short chunk at a longer context) on the tiny model: logits through
    the kernel and through torch's gather-and-softmax path agree."""
    model, cfg = engine_tiny.model, engine_tiny.cfg
    ids = lambda n, s: torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(s)).tolist()  # noqa: E731
    outs = []
    for path in ("kernel", "torch"):
        if path == "torch":
            monkeypatch.setattr(mla.cpu_attention, "handles", lambda *a: False)
        cache = PagedLatentCache(cfg, num_blocks=64, block_size=16)
        seqs = [SequenceBlocks() for _ in range(4)]
        for i, (seq, n) in enumerate(zip(seqs, (30, 7, 150, 1))):
            model.forward(build_step([SequenceChunk(seq, ids(n, i))], cache), cache)
        step = [SequenceChunk(s, ids(n, 10 + i)) for i, (s, n) in enumerate(zip(seqs, (1, 45, 3, 1)))]
        outs.append(model.forward(build_step(step, cache), cache, all_logits=True))  # [T, V]
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4


def test_bad_arguments_name_what_is_wrong():
    q, cache, key_slots, q_start, q_len, k_len = _case(4, 16, 24, [(2, 40), (1, 9)], seed=1)
    lat, pe = q[..., :16], q[..., 16:]
    run = cpu_attention.latent_attention
    bad = key_slots.clone()
    bad[1, 3] = cache.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        run(lat, pe, cache, bad, q_start, q_len, k_len, 1.0)
    with pytest.raises(ValueError, match="more new tokens than keys"):
        run(lat, pe, cache, key_slots, q_start, q_len, torch.tensor([1, 9]), 1.0)
    with pytest.raises(ValueError, match="outside the step"):
        run(lat, pe, cache, key_slots, q_start + 1, q_len, k_len, 1.0)
    with pytest.raises(ValueError, match="float32"):
        run(lat.double(), pe, cache, key_slots, q_start, q_len, k_len, 1.0)
    with pytest.raises(ValueError, match="latent"):
        run(lat, pe, cache[:, :-1], key_slots, q_start, q_len, k_len, 1.0)
    with pytest.raises(ValueError, match="sequences"):
        run(lat, pe, cache, key_slots[:1], q_start, q_len, k_len, 1.0)
    with pytest.raises(ValueError, match="both"):
        run(lat, pe[:1], cache, key_slots, q_start, q_len, k_len, 1.0)
