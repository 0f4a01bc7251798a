"""MTP speculative decoding: verify a sequence's drafts with the main model, propose the next ones with the MTP layer.

A decode step of a sequence whose last step proposed drafts d_1..d_k runs the main model on [t_L, d_1..d_k] at
positions L..L+k (one forward, so one pool round trip per MoE layer, as a plain decode step). The runner then
keeps:
  * temperature 0: the drafts up to the first that differs from the main model's argmax before it, then the
    argmax after the last kept (1 to k + 1 tokens); the latent entries of the positions after the last kept are
    given back. Greedy output is the main model's, token for token, whatever the drafts.
  * temperature > 0: d_j, in order, with probability min(1, p_j(d_j) / q_j(d_j)), p_j the main model's
    distribution at L + j - 1 and q_j the one d_j was drawn from; at the first rejection a draw from
    norm(max(0, p_j - q_j)) ends the step; with every draft kept, a draw from p at L + k follows. Each emitted
    token is distributed as the main model's sampling would make it (Leviathan et al., Chen et al. 2023); draws
    come from the request's own seeded generator, so seeded runs reproduce.
Then the MTP layer reads the pairs (h_i, t_{i+1}) of every position the step kept (its final hidden state and the
token that followed) into its own cache layer, and its guess after the last one is the first draft. With
num_speculative_tokens k > 1 the one MTP layer is applied again, as vLLM does: the pair (g, d_j), g its own
output hidden state (after shared_head.norm, the analogue of the main model's final norm) at the position before,
at the next position guesses d_{j+1}. Those entries are overwritten with the main model's pairs once the drafts
are verified. Prefill chunks feed it too (the next token of a prompt position is the prompt's, or the sampled one
at its end), so the MTP layer sees the whole prefix. Positions after which no guess is wanted (all of a chunk's but
its last, and every position of a request whose drafting is paused while the batch is above --mtp-max-batch) only
get their cache entries written (`MTPModule.feed`: no attention, experts or head for them), the same values the
whole layer writes; so a paused request resumes drafting when the batch shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.attention.batch import SequenceChunk, StepBatch
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from services.gateway.model import GatewayModel, run_interleaved
from services.gateway.mtp import MTPModule
from services.gateway.requests import Request
from services.gateway.scheduler import ChunkResult, PlannedChunk


def verify_greedy(targets: list[int], draft: list[int]) -> tuple[list[int], int]:
    """targets: the main model's argmax at each position fed (1 + len(draft)). -> (tokens kept, drafts accepted):
    the drafts up to the first that differs from the argmax before it, then the argmax after the last kept."""
    accepted = 0
    while accepted < len(draft) and targets[accepted] == draft[accepted]:
        accepted += 1
    return targets[: accepted + 1], accepted


def verify_sampled(
    p: torch.Tensor, draft: list[int], q: torch.Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """p [k + 1, V]: the main model's sampling distributions at each draft's position and after the last; q [k, V]:
    the ones the drafts were drawn from. -> (tokens kept, drafts accepted), distributed as draws from p."""
    kept = []
    for j, d in enumerate(draft):
        u = float(torch.rand((), generator=generator))
        if u * float(q[j, d]) < float(p[j, d]):  # accepted with probability min(1, p(d) / q(d))
            kept.append(d)
            continue
        residual = (p[j] - q[j]).clamp(min=0)  # [V]
        if float(residual.sum()) <= 0:  # p == q (up to rounding): rejection then has probability 0; draw from p
            residual = p[j]
        return [*kept, int(torch.multinomial(residual, 1, generator=generator))], j
    return [*kept, int(torch.multinomial(p[len(draft)], 1, generator=generator))], len(draft)


def decode_tokens(
    req: Request, chunk: PlannedChunk, rows: torch.Tensor, targets: list[int] | None
) -> tuple[list[int], int]:
    """The tokens a sampling chunk emits: rows [1 + len(draft), V] (the logits at each position fed), targets their
    argmax for a greedy request. -> (tokens, drafts accepted)."""
    if targets is not None:
        return verify_greedy(targets, chunk.draft) if chunk.draft else ([targets[-1]], 0)
    if chunk.draft and req.draft_probs is not None:
        k = len(chunk.draft)  # the scheduler may have cut the draft short: its first k distributions
        p = torch.stack([req.sampler.probs(row) for row in rows[: k + 1]])  # [k + 1, V]
        return verify_sampled(p, chunk.draft, req.draft_probs[:k], req.sampler.generator)
    return [req.sampler(rows[-1])], 0


@dataclass
class _Pairs:
    """One sequence's part of an MTP pass: the pairs (h_i, t_{i+1}) at positions start, start + 1, ..."""

    index: int  # its chunk in the step
    seq: SequenceBlocks
    start: int
    next_tokens: list[int]
    hidden: torch.Tensor  # [n, H]
    drafts: int  # drafts wanted after the last pair (0: none)


def _split_last(p: _Pairs) -> list[_Pairs]:
    """A part that wants drafts, split so that only its last position runs the whole MTP layer (the guess after
    it is the only one read); the positions before it are fed first."""
    n = len(p.next_tokens)
    if not p.drafts or n == 1:
        return [p]
    last = p.start + n - 1
    return [
        _Pairs(p.index, p.seq, p.start, p.next_tokens[:-1], p.hidden[:-1], 0),
        _Pairs(p.index, SequenceBlocks(p.seq.blocks, last), last, p.next_tokens[-1:], p.hidden[-1:], p.drafts),
    ]


@dataclass
class _Drafting:
    """A sequence whose drafts are being proposed: where the next pair goes and what it reads."""

    request: Request
    result: ChunkResult
    position: int  # the next pair's position
    drafts: int  # drafts wanted in all
    probs: list[torch.Tensor]  # temperature > 0: the distribution [V] each draft was drawn from


class MTPDrafter:
    """Runs the MTP layer after each step for the sequences that draft, and proposes their next drafts."""

    def __init__(self, mtp: MTPModule, model: GatewayModel, cache: PagedLatentCache, num_speculative_tokens: int = 1):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.mtp, self.model, self.cache = mtp, model, cache
        self.num_speculative_tokens = num_speculative_tokens

    @staticmethod
    def wants(chunk: PlannedChunk) -> bool:
        """Whether the chunk's sequence feeds the MTP layer this step: a generate request for which a draft may
        still pay (after this step at least 2 tokens may be left to generate)."""
        req = chunk.request
        if req.is_score:
            return False
        produced = len(req.output) if not req.prefilling else 0
        return req.params.max_tokens - produced >= 3

    def propose(
        self,
        chunks: list[PlannedChunk],
        starts: list[int],
        hidden: list[torch.Tensor | None],
        results: list[ChunkResult],
    ) -> None:
        """Feed the kept positions of every chunk with `hidden` rows to the MTP layer; set the drafts on `results`
        (then apply the layer again on its own guesses for further drafts)."""
        pairs = [
            p
            for i, c in enumerate(chunks)
            if hidden[i] is not None
            for p in [self._pairs(i, c, starts[i], hidden[i], results[i])]
            if p is not None
        ]
        pairs = [part for p in pairs for part in _split_last(p)]
        fed = [p for p in pairs if not p.drafts]  # no guess wanted after them: their cache entries only
        if fed:
            batch = StepBatch.build([SequenceChunk(p.seq, p.next_tokens) for p in fed], self.cache)
            device = self.model.device
            self.mtp.feed(self.model, batch.to(device), self.cache, torch.cat([p.hidden for p in fed]).to(device))
        pairs = [p for p in pairs if p.drafts]
        if not pairs:
            return
        batch = StepBatch.build([SequenceChunk(p.seq, p.next_tokens) for p in pairs], self.cache)
        logits, states = self._run(batch, torch.cat([p.hidden for p in pairs]), batch.last_index.tolist())
        drafting = []
        for row, p in enumerate(pairs):
            req = chunks[p.index].request
            d = _Drafting(req, results[p.index], p.start + len(p.next_tokens), self._room(req, p.drafts), [])
            self._draw(d, logits[row])
            drafting.append(d)
        everyone = drafting
        while True:  # num_speculative_tokens > 1: the MTP layer again, on its own last guess
            more = [j for j, d in enumerate(drafting) if len(d.result.draft) < d.drafts]
            if not more:
                break
            drafting, states = [drafting[j] for j in more], states[more]
            views = [SequenceBlocks(d.request.seq.blocks, d.position) for d in drafting]  # private, as in _pairs
            batch = StepBatch.build(
                [SequenceChunk(view, d.result.draft[-1:]) for view, d in zip(views, drafting)], self.cache
            )
            logits, states = self._run(batch, states, batch.last_index.tolist())
            for row, d in enumerate(drafting):
                d.position += 1
                self._draw(d, logits[row])
        for d in everyone:
            if d.probs:
                d.result.draft_probs = torch.stack(d.probs)  # [drafts, V]

    def _run(self, batch: StepBatch, hidden: torch.Tensor, logit_index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP pass -> logits [N, V] (cpu) and the layer's output hidden states [N, H] at `logit_index`."""
        device = self.model.device
        stage = self.mtp.forward_stages(
            self.model,
            batch.to(device),
            self.cache,
            hidden.to(device),
            torch.tensor(logit_index, dtype=torch.int64, device=device),
            with_hidden=True,
        )
        logits, states = run_interleaved([stage])[0]
        return logits.cpu(), states

    def _room(self, req: Request, drafts: int) -> int:
        """Drafts after the first need their pair's position in the cache: as many as free blocks allow."""
        while drafts > 1 and not self.cache.can_fit(req.seq, drafts - 1):
            drafts -= 1
        if drafts > 1:
            self.cache.reserve(req.seq, drafts - 1)  # the next step's verify reserves these positions anyway
        return drafts

    @staticmethod
    def _draw(d: _Drafting, logits: torch.Tensor) -> None:
        """The next draft from the MTP layer's logits [V]: the argmax, or a draw (temperature > 0)."""
        req, result = d.request, d.result
        if req.params.temperature == 0:
            result.draft.append(int(logits.argmax()))
            return
        q = req.sampler.probs(logits)
        result.draft.append(int(torch.multinomial(q, 1, generator=req.sampler.generator)))
        d.probs.append(q)

    def _pairs(
        self, index: int, chunk: PlannedChunk, start: int, hidden: torch.Tensor, result: ChunkResult
    ) -> _Pairs | None:
        """The positions the step kept (a prefill chunk: all; a decode: the last token and the accepted drafts),
        each with the token that follows it."""
        req = chunk.request
        emitted = [] if result.token is None else [result.token, *result.extra]
        produced = len(req.output) + len(emitted)
        if result.token is not None and req.params.max_tokens - produced < 2:
            return None  # no draft will be verified after this step: the MTP layer need not see it
        kept = len(chunk.token_ids) if req.prefilling else 1 + result.accepted
        known = req.prompt + req.output + emitted  # token at each position (output[-1] at start for a decode)
        next_tokens = known[start + 1 : start + 1 + kept]
        # drafts worth verifying: a step emits at most drafts + 1 tokens, and max_tokens - produced are left; none
        # while drafting is paused (the batch is above --mtp-max-batch)
        drafts = (
            0
            if result.token is None or req.mtp_paused
            else min(self.num_speculative_tokens, req.params.max_tokens - produced - 1)
        )
        # a private view of the sequence's blocks: building the MTP batch must not advance the sequence's length
        return _Pairs(index, SequenceBlocks(req.seq.blocks, start), start, next_tokens, hidden[:kept], drafts)
