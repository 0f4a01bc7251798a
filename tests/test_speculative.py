"""MTP speculative decoding in process: greedy output identical to plain decoding token for token (mixed prompt
lengths, continuous batching, chunked prefill, drafts accepted and rejected), rejection sampling that keeps the
main model's distribution at temperature > 0, seeded runs that reproduce, and the scheduler's part alone."""

from __future__ import annotations

import pytest
import torch

from services.attention.kv_cache import PagedLatentCache
from services.format.presets import preset_config
from services.gateway.engine import Engine
from services.gateway.requests import Request
from services.gateway.sampling import Sampler, SamplingParams
from services.gateway.scheduler import ChunkResult, Scheduler
from services.gateway.speculative import MTPDrafter, verify_greedy, verify_sampled

OPTIONS = dict(cache_tokens=4096, block_size=16, max_running=4, max_step_tokens=24)  # joins mid-way, chunked prefill
LENGTHS = [1, 5, 17, 40, 9, 30]  # prompt lengths
NEW = [70, 64, 66, 3, 64, 2]  # max_tokens: 64+, and the edges where no draft can pay


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engines(tiny_fp8):
    return Engine.from_dir(tiny_fp8, **OPTIONS), Engine.from_dir(tiny_fp8, mtp=True, **OPTIONS)


@pytest.fixture(scope="module")
def plain_outputs(engines):
    prompts = [_ids(n, i) for i, n in enumerate(LENGTHS)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in NEW]
    return prompts, params, engines[0].generate(prompts, params)


def test_greedy_output_with_mtp_is_identical(engines, plain_outputs):
    prompts, params, plain = plain_outputs
    spec = engines[1].generate(prompts, params)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
    for g, m in zip(spec, NEW):  # a draft after every step that leaves 2 or more tokens to generate
        assert (g.draft_tokens > 0) == (m >= 3) and 1 + g.draft_tokens + g.accepted_tokens <= m
    assert engines[1].cache.free_blocks == engines[1].cache.num_blocks  # every block given back


def test_accepted_drafts_keep_greedy_output_identical(engines, plain_outputs, monkeypatch):
    """Drafts right two times in three (the true continuation, wrong otherwise): accepted drafts emit two tokens
    per step, rejected ones roll the sequence back, and the output stays the main model's."""
    prompts, params, plain = plain_outputs
    truth = {tuple(p): g.token_ids for p, g in zip(prompts, plain)}
    propose, calls = MTPDrafter.propose, [0]

    def oracle(self, chunks, starts, hidden, results):
        propose(self, chunks, starts, hidden, results)
        for chunk, result in zip(chunks, results):
            if result.draft:
                done = len(chunk.request.output) + 1 + len(result.extra)
                calls[0] += 1
                right = truth[tuple(chunk.request.prompt)][done]
                result.draft = [right if calls[0] % 3 else (right + 1) % 1024]

    monkeypatch.setattr(MTPDrafter, "propose", oracle)
    spec = engines[1].generate(prompts, params)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids
    drafted, accepted = sum(g.draft_tokens for g in spec), sum(g.accepted_tokens for g in spec)
    assert 0.55 < accepted / drafted < 0.8  # two thirds right
    assert engines[1].cache.free_blocks == engines[1].cache.num_blocks


def test_logprobs_and_scores_beside_mtp(engines, monkeypatch):
    """Each emitted token's logprob comes from the row it was predicted at, accepted drafts included."""
    prompt = _ids(11, 42)
    plain = _run(engines[0], prompt, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3))
    propose = MTPDrafter.propose

    def always_right(self, chunks, starts, hidden, results):
        propose(self, chunks, starts, hidden, results)
        for chunk, result in zip(chunks, results):
            if result.draft:
                result.draft = [plain.output[len(chunk.request.output) + 1 + len(result.extra)]]

    monkeypatch.setattr(MTPDrafter, "propose", always_right)
    spec = _run(engines[1], prompt, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3))
    assert spec.output == plain.output and spec.accepted_tokens == spec.draft_tokens > 0
    assert len(spec.token_logprobs) == len(spec.output)
    for (lp_a, top_a), (lp_b, top_b) in zip(plain.token_logprobs, spec.token_logprobs):
        assert abs(lp_a - lp_b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]
    scores = engines[1].score(prompt, top_k=2)
    assert [s.token_id for s in scores] == prompt


def _run(engine, prompt, params):
    req = Request(list(prompt), params)
    engine.core.submit(req)
    engine.core.run_until_idle()
    return req


def test_sampled_mtp_runs_reproduce_with_their_seeds(engines):
    prompts = [_ids(n, 7 + n) for n in (6, 19)]
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=s, ignore_eos=True) for s in (3, 4)]
    first, again = engines[1].generate(prompts, params), engines[1].generate(prompts[::-1], params[::-1])[::-1]
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert all(len(g.token_ids) == 20 and g.draft_tokens == 18 for g in first)


# ---- rejection sampling keeps the main model's distribution --------------------------------------------------
SAMPLES = 20000


def test_rejection_sampling_draws_from_the_target_distribution(engines):
    """At one position of the tiny model: p the main model's sampling distribution (temperature 1, top-k 12), q a
    draft distribution sharing part of its support (half the main model's top-6 one position further, half p
    sharpened). Over SAMPLES
    seeded draws d ~ q, the first token kept is distributed as p: every frequency within 4.5 standard errors
    (+0.002) of p, total variation under 0.02; accepted drafts are followed by a draw from p at the next row."""
    engine = engines[1]
    prompt = _ids(13, 99)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=12))
    logits = _main_logits(engine, prompt)  # [2, V]: at the prompt's end and one further
    p = torch.stack([sampler.probs(row) for row in logits])
    q = 0.5 * Sampler(SamplingParams(temperature=1.0, top_k=6)).probs(logits[1]) + 0.5 * p[0] ** 2 / (p[0] ** 2).sum()
    counts, accepted, second = torch.zeros_like(p[0]), 0, torch.zeros_like(p[0])
    for seed in range(SAMPLES):
        gen = torch.Generator().manual_seed(seed)
        draft = int(torch.multinomial(q, 1, generator=gen))
        tokens, n = verify_sampled(p, [draft], q[None], gen)
        counts[tokens[0]] += 1
        accepted += n
        if n:
            second[tokens[1]] += 1
    freq = counts / SAMPLES
    sigma = (p[0] * (1 - p[0]) / SAMPLES).sqrt()
    assert ((freq - p[0]).abs() <= 4.5 * sigma + 0.002).all(), (freq - p[0]).abs().max()
    assert 0.5 * (freq - p[0]).abs().sum() < 0.02
    assert freq[p[0] == 0].sum() == 0  # never a token the target cannot draw
    expected = torch.minimum(p[0], q).sum().item()  # P(accept) = sum min(p, q)
    assert abs(accepted / SAMPLES - expected) < 4.5 * (expected * (1 - expected) / SAMPLES) ** 0.5
    assert second[p[1] == 0].sum() == 0 and accepted == second.sum()


def _main_logits(engine, prompt):
    from services.attention.batch import SequenceChunk
    from services.attention.kv_cache import SequenceBlocks
    from tests.model_steps import build_step

    seq = SequenceBlocks()
    try:
        batch = build_step([SequenceChunk(seq, prompt)], engine.cache)
        return engine.model.forward(batch, engine.cache, all_logits=True)[-2:]
    finally:
        engine.cache.release(seq)


def test_chained_rejection_sampling_keeps_each_position_distributed_as_the_target():
    """k = 2 drafts (num_speculative_tokens 2): p0, p1, p2 three target distributions, q0, q1 the drafts'. Over
    SAMPLES seeded chains, the first token kept is distributed as p0 and the second as p1 (a chain that stopped
    after one token goes on with a draw from p1, as the next step would): frequencies within 4.5 standard errors
    (+0.002), total variation under 0.02; both drafts are accepted about sum(min(p0, q0)) * sum(min(p1, q1)) of
    the time."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 12, generator=gen) * 1.5, -1)  # [3, V]
    q = torch.softmax(torch.randn(2, 12, generator=gen) * 1.5, -1)  # [2, V]
    first, second, both = torch.zeros(12), torch.zeros(12), 0
    for seed in range(SAMPLES):
        g = torch.Generator().manual_seed(seed)
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        tokens, n = verify_sampled(p, drafts, q, g)
        assert len(tokens) == n + 1 and tokens[:n] == drafts[:n]
        if len(tokens) == 1:
            tokens.append(int(torch.multinomial(p[1], 1, generator=g)))
        first[tokens[0]] += 1
        second[tokens[1]] += 1
        both += n == 2
    for freq, target in ((first / SAMPLES, p[0]), (second / SAMPLES, p[1])):
        sigma = (target * (1 - target) / SAMPLES).sqrt()
        assert ((freq - target).abs() <= 4.5 * sigma + 0.002).all(), (freq - target).abs().max()
        assert 0.5 * (freq - target).abs().sum() < 0.02
    expected = (torch.minimum(p[0], q[0]).sum() * torch.minimum(p[1], q[1]).sum()).item()
    assert abs(both / SAMPLES - expected) < 4.5 * (expected * (1 - expected) / SAMPLES) ** 0.5


def test_greedy_verification_keeps_the_agreeing_prefix():
    assert verify_greedy([4, 9], [4]) == ([4, 9], 1)
    assert verify_greedy([4, 9], [5]) == ([4], 0)
    assert verify_greedy([3, 8, 2], [3, 7]) == ([3, 8], 1)


# ---- the scheduler's part ---------------------------------------------------------------------------------
def test_scheduler_plans_one_plus_draft_and_commits_what_the_runner_kept():
    cache = PagedLatentCache(preset_config("tiny"), num_blocks=8, block_size=16)
    sched = Scheduler(cache, eos_token_ids=(1,), max_step_tokens=16)
    req = Request(_ids(5, 1), SamplingParams(max_tokens=4))
    sched.submit(req)
    plan = sched.plan()
    sched.commit(plan, [ChunkResult(token=7, draft=[8])])
    assert req.draft == [8]
    plan = sched.plan()
    assert plan.chunks[0].token_ids == [7, 8] and plan.chunks[0].draft == [8]
    sched.commit(plan, [ChunkResult(token=8, extra=[9], accepted=1, draft=[1])])  # the draft accepted, a bonus
    assert req.output == [7, 8, 9] and (req.draft_tokens, req.accepted_tokens) == (1, 1)
    plan = sched.plan()  # one token left to generate: no draft to verify, even though one was proposed
    assert plan.chunks[0].token_ids == [9] and plan.chunks[0].draft == []
    req.draft = [3]
    sched.commit(plan, [ChunkResult(token=1, extra=[], draft=[3])])
    assert req.finish_reason == "stop" and req.output == [7, 8, 9, 1]
    assert (sched.draft_tokens, sched.accepted_tokens) == (1, 1)


def test_scheduler_cuts_drafts_to_the_tokens_left_and_the_budget():
    cache = PagedLatentCache(preset_config("tiny"), num_blocks=8, block_size=16)
    sched = Scheduler(cache, eos_token_ids=(1,), max_step_tokens=16)
    req = Request(_ids(5, 1), SamplingParams(max_tokens=4))
    sched.submit(req)
    sched.commit(sched.plan(), [ChunkResult(token=7, draft=[8, 9, 10])])
    plan = sched.plan()  # 3 tokens left: the step may emit 1 + 2 drafts
    assert plan.chunks[0].token_ids == [7, 8, 9] and plan.chunks[0].draft == [8, 9]
    sched.commit(plan, [ChunkResult(token=8, extra=[2], accepted=1, draft=[5, 6])])
    assert req.output == [7, 8, 2] and (req.draft_tokens, req.accepted_tokens) == (2, 1)
    sched.max_step_tokens = 2
    plan = sched.plan()
    assert plan.chunks[0].token_ids == [2] and plan.chunks[0].draft == []  # one token left: nothing to verify


def test_a_stop_token_among_accepted_drafts_ends_the_request_there():
    cache = PagedLatentCache(preset_config("tiny"), num_blocks=8, block_size=16)
    sched = Scheduler(cache, eos_token_ids=(1,), max_step_tokens=16)
    req = Request(_ids(5, 2), SamplingParams(max_tokens=10, logprobs=1))
    sched.submit(req)
    req.token_logprobs.append((-0.5, []))
    sched.commit(sched.plan(), [ChunkResult(token=7, draft=[1])])
    plan = sched.plan()
    req.token_logprobs += [(-0.1, []), (-0.2, [])]  # what the runner adds for the two tokens it kept
    sched.commit(plan, [ChunkResult(token=1, extra=[4], accepted=1, draft=[5])])
    assert req.output == [7, 1] and req.finish_reason == "stop" and req.draft == []
    assert [lp for lp, _ in req.token_logprobs] == [-0.5, -0.1]  # one per output token
    assert cache.free_blocks == 8


def test_a_mixed_step_batches_short_chunks_and_each_equals_its_sequence_alone(engines):
    """Decodes, 1 + draft chunks and a long prefill chunk in one step (what a verify step beside a new prompt
    is): the short ones attend as one padded batch, each over its own keys; every row equals its sequence alone."""
    from services.attention.batch import SequenceChunk
    from services.attention.kv_cache import SequenceBlocks
    from tests.model_steps import build_step

    model, cfg = engines[0].model, engines[0].cfg
    cache = PagedLatentCache(cfg, num_blocks=64, block_size=16)
    history = [_ids(n, 50 + i) for i, n in enumerate((30, 5, 1, 12, 7))]
    chunks = [_ids(n, 60 + i) for i, n in enumerate((2, 1, 40, 3, 8))]
    seqs = [SequenceBlocks() for _ in history]
    for seq, ids in zip(seqs, history):
        model.forward(build_step([SequenceChunk(seq, ids)], cache), cache)
    step = build_step([SequenceChunk(s, c) for s, c in zip(seqs, chunks)], cache)
    assert not step.uniform
    mixed = model.forward(step, cache, all_logits=True)  # [T, V]
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


@pytest.mark.parametrize("k", [2, 3])
def test_recursive_drafts_keep_greedy_output_identical(tiny_fp8, plain_outputs, monkeypatch, k):
    """num_speculative_tokens k > 1: the MTP layer applied again on its own guesses, then (an oracle over what it
    proposed) each draft right with probability 3/4. Greedy output stays the main model's; steps emit up to k + 1
    tokens; every block comes back."""
    prompts, params, plain = plain_outputs
    engine = Engine.from_dir(tiny_fp8, mtp=True, num_speculative_tokens=k, **OPTIONS)
    real = engine.generate(prompts, params)  # the layer's own recursive guesses (random weights: rejected)
    assert [g.token_ids for g in real] == [g.token_ids for g in plain]
    assert all(g.draft_tokens > 0 for g, m in zip(real, NEW) if m >= 3)
    verify_steps = NEW[0] - 1 - real[0].accepted_tokens  # each emits 1 + its accepted drafts
    assert real[0].draft_tokens / verify_steps > k - 0.2  # k drafts a step but near max_tokens
    assert engine.cache.free_blocks == engine.cache.num_blocks
    truth = {tuple(p): g.token_ids for p, g in zip(prompts, plain)}
    propose, rng = MTPDrafter.propose, torch.Generator().manual_seed(k)
    lengths = []

    def oracle(self, chunks, starts, hidden, results):
        propose(self, chunks, starts, hidden, results)
        for chunk, result in zip(chunks, results):
            if result.draft:
                done = len(chunk.request.output) + 1 + len(result.extra)
                right = truth[tuple(chunk.request.prompt)][done : done + len(result.draft)]
                wrong = torch.rand(len(right), generator=rng) < 0.25
                result.draft = [(t + 1) % 1024 if w else t for t, w in zip(right, wrong.tolist())]
                lengths.append(len(result.draft))

    monkeypatch.setattr(MTPDrafter, "propose", oracle)
    spec = engine.generate(prompts, params)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert max(lengths) == k  # full-length drafts were proposed (shorter near max_tokens)
    drafted, accepted = sum(g.draft_tokens for g in spec), sum(g.accepted_tokens for g in spec)
    assert 0.4 < accepted / drafted < 0.8
    assert engine.cache.free_blocks == engine.cache.num_blocks
    params = [SamplingParams(max_tokens=20, temperature=0.8, seed=s, ignore_eos=True) for s in (3, 4)]
    monkeypatch.setattr(MTPDrafter, "propose", propose)
    first, again = engine.generate(prompts[:2], params), engine.generate(prompts[:2], params)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]


def _recording_drafts(monkeypatch) -> dict:
    """Every draft proposed, by (prompt, tokens produced once the step's tokens are in)."""
    drafts, propose = {}, MTPDrafter.propose

    def record(self, chunks, starts, hidden, results):
        propose(self, chunks, starts, hidden, results)
        for chunk, result in zip(chunks, results):
            if result.draft:
                done = len(chunk.request.output) + 1 + len(result.extra)
                drafts[(tuple(chunk.request.prompt), done)] = list(result.draft)

    monkeypatch.setattr(MTPDrafter, "propose", record)
    return drafts


def test_above_mtp_max_batch_drafting_pauses_and_resumes_where_it_left_off(tiny_fp8, plain_outputs, monkeypatch):
    """While more requests run than --mtp-max-batch, none drafts; the MTP layer's cache is still fed (its entries
    only), so when the batch shrinks drafting resumes, and each draft then is the one an unpaused run proposes
    at that position."""
    prompts, params, plain = plain_outputs
    drafts = _recording_drafts(monkeypatch)
    engine = Engine.from_dir(tiny_fp8, mtp=True, mtp_max_batch=3, **OPTIONS)  # 4 run at once: above the limit
    out = engine.generate(prompts, params)
    assert [g.token_ids for g in out] == [g.token_ids for g in plain]
    paused = dict(drafts)
    resumed = {key: d for key, d in paused.items() if key[0] == tuple(prompts[0])}
    assert resumed and min(done for _, done in resumed) > 4  # it drafted again, after steps without drafts
    drafts.clear()
    alone = Engine.from_dir(tiny_fp8, mtp=True, **OPTIONS)
    alone.generate(prompts[:1], params[:1])  # never paused
    assert all(drafts.get(key) == d for key, d in resumed.items()), "a resumed draft differs from the unpaused one"
    cache = PagedLatentCache(preset_config("tiny"), num_blocks=8, block_size=16)
    sched = Scheduler(cache, eos_token_ids=(1,), mtp_max_batch=1)
    reqs = [Request(_ids(3, 70 + i), SamplingParams(max_tokens=8)) for i in range(2)]
    for r in reqs:
        sched.submit(r)
    sched.commit(sched.plan(), [ChunkResult(token=7, draft=[8]), ChunkResult(token=7, draft=[8])])
    plan = sched.plan()  # two running, limit 1: no draft planned
    assert all(c.draft == [] and c.request.mtp_paused for c in plan.chunks)
    assert MTPDrafter.wants(plan.chunks[0])  # its MTP cache is still fed
    sched.commit(plan, [ChunkResult(token=7), ChunkResult(token=7)])
    sched.cancel(reqs[1])
    plan = sched.plan()  # one left: drafting resumes
    assert [c.request for c in plan.chunks] == [reqs[0]] and not reqs[0].mtp_paused
