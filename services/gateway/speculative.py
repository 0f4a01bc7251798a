"""MTP speculative decoding: verify a sequence's draft with the main model, propose the next one with the MTP layer.

A decode step of a sequence whose last step proposed a draft d runs the main model on [t_L, d] at positions L,
L+1 (one forward, so one pool round trip per MoE layer, as a plain decode step). The runner then keeps:
  * temperature 0: d when the main model's argmax at L equals it, and then the argmax at L+1 as well (2 tokens);
    else the argmax at L alone (1 token), and position L+1's latent entries are given back (length - 1). Greedy
    output is the main model's, token for token, whatever the draft.
  * temperature > 0: d with probability min(1, p(d) / q(d)), p the main model's distribution at L and q the one d
    was drawn from, then a draw from p at L+1; else a draw from norm(max(0, p - q)). Each emitted token is
    distributed as the main model's sampling would make it (Leviathan et al., Chen et al. 2023); draws come from
    the request's own seeded generator, so seeded runs reproduce.
Then the MTP layer reads the pairs (h_i, t_{i+1}) of every position the step kept (its final hidden state and the
token that followed) into its own cache layer, and its guess after the last one is the next draft. Prefill
chunks feed it too (the next token of a prompt position is the prompt's, or the sampled one at its end), so the
MTP layer sees the whole prefix.
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


def verify_sampled(p: torch.Tensor, draft: int, q: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """p [2, V]: the main model's sampling distributions at the draft's position and after it; q [V]: the one the
    draft was drawn from. -> (tokens kept, drafts accepted), distributed as draws from p."""
    u = float(torch.rand((), generator=generator))
    if u * float(q[draft]) < float(p[0, draft]):  # accepted with probability min(1, p(d) / q(d))
        return [draft, int(torch.multinomial(p[1], 1, generator=generator))], 1
    residual = (p[0] - q).clamp(min=0)  # [V]
    if float(residual.sum()) <= 0:  # p == q (up to rounding): rejection then has probability 0; draw from p
        residual = p[0]
    return [int(torch.multinomial(residual, 1, generator=generator))], 0


def decode_tokens(
    req: Request, chunk: PlannedChunk, rows: torch.Tensor, targets: list[int] | None
) -> tuple[list[int], int]:
    """The tokens a sampling chunk emits: rows [1 + len(draft), V] (the logits at each position fed), targets their
    argmax for a greedy request. -> (tokens, drafts accepted)."""
    if targets is not None:
        return verify_greedy(targets, chunk.draft) if chunk.draft else ([targets[-1]], 0)
    if chunk.draft and req.draft_probs is not None:
        p = torch.stack([req.sampler.probs(row) for row in rows[:2]])  # [2, V]
        return verify_sampled(p, chunk.draft[0], req.draft_probs, req.sampler.generator)
    return [req.sampler(rows[-1])], 0


@dataclass
class _Pairs:
    """One sequence's part of an MTP pass: the pairs (h_i, t_{i+1}) at positions start, start + 1, ..."""

    index: int  # its chunk in the step
    seq: SequenceBlocks
    start: int
    next_tokens: list[int]
    hidden: torch.Tensor  # [n, H]
    propose: bool  # a draft is wanted after the last pair


class MTPDrafter:
    """Runs the MTP layer after each step for the sequences that draft, and proposes their next drafts."""

    def __init__(self, mtp: MTPModule, model: GatewayModel, cache: PagedLatentCache, num_speculative_tokens: int = 1):
        if num_speculative_tokens != 1:
            raise ValueError(
                f"num_speculative_tokens {num_speculative_tokens}: only 1 is implemented (one MTP layer, "
                "one draft per step)"
            )
        self.mtp, self.model, self.cache = mtp, model, cache

    @staticmethod
    def wants(chunk: PlannedChunk) -> bool:
        """Whether the chunk's sequence feeds the MTP layer this step: a generate request for which a draft may
        still pay (after this step at least 2 tokens may be left to generate)."""
        req = chunk.request
        if req.is_score or req.mtp_off:
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
        """Feed the kept positions of every chunk with `hidden` rows to the MTP layer; set the drafts on `results`."""
        pairs = [
            p
            for i, c in enumerate(chunks)
            if hidden[i] is not None
            for p in [self._pairs(i, c, starts[i], hidden[i], results[i])]
            if p is not None
        ]
        if not pairs:
            return
        batch = StepBatch.build([SequenceChunk(p.seq, p.next_tokens) for p in pairs], self.cache)
        ends = batch.last_index.tolist()
        wanted = [k for k, p in enumerate(pairs) if p.propose]
        device = self.model.device
        stage = self.mtp.forward_stages(
            self.model,
            batch.to(device),
            self.cache,
            torch.cat([p.hidden for p in pairs]).to(device),
            torch.tensor([ends[k] for k in wanted], dtype=torch.int64, device=device),
        )
        logits = run_interleaved([stage])[0].cpu()  # [N, V]
        for row, k in enumerate(wanted):
            req, result = chunks[pairs[k].index].request, results[pairs[k].index]
            if req.params.temperature == 0:
                result.draft = [int(logits[row].argmax())]
            else:
                q = req.sampler.probs(logits[row])
                result.draft, result.draft_probs = [int(torch.multinomial(q, 1, generator=req.sampler.generator))], q

    @staticmethod
    def _pairs(index: int, chunk: PlannedChunk, start: int, hidden: torch.Tensor, result: ChunkResult) -> _Pairs | None:
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
        # a private view of the sequence's blocks: building the MTP batch must not advance the sequence's length
        return _Pairs(
            index,
            SequenceBlocks(req.seq.blocks, start),
            start,
            next_tokens,
            hidden[:kept],
            propose=result.token is not None,
        )
