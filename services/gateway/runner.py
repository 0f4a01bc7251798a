"""The runner: executes a step plan on the model and gives back one result per chunk.

It builds the step's batch (optionally split into micro-batches whose attention overlaps the pools' expert
work on the others), runs the forward pass, then samples (one batched argmax for every greedy request, a
seeded sampler for the others) and scores (log-probabilities of the prompt tokens, for score requests; of each
generated token and its top alternatives, for requests that ask for logprobs).
"""

from __future__ import annotations

import torch
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan

from kernels.cpu_argmax import argmax_rows
from services.attention.batch import SequenceChunk, StepBatch
from services.attention.kv_cache import PagedLatentCache
from services.gateway.model import GatewayModel, run_interleaved
from services.gateway.requests import PositionScore
from services.gateway.scheduler import ChunkResult, PlannedChunk, StepPlan
from services.gateway.speculative import MTPDrafter, decode_tokens
from services.rpc.telemetry import tracer


class ModelRunner:
    def __init__(
        self, model: GatewayModel, cache: PagedLatentCache, micro_batches: int = 1, drafter: MTPDrafter | None = None
    ):
        self.model = model
        self.cache = cache
        # >1 with remote experts: each step is split into micro-batches whose attention runs while the others'
        # experts are computed on the pools
        self.micro_batches = micro_batches
        self.drafter = drafter  # MTP speculative decoding (services/gateway/speculative.py), or None

    def execute(self, plan: StepPlan) -> list[ChunkResult]:
        chunks = plan.chunks
        starts = [c.request.seq.length for c in chunks]  # each chunk's first position
        drafting = [self.drafter is not None and self.drafter.wants(c) for c in chunks]
        with _step_span(plan):
            # per chunk: logits [n, V] (n = 1, 1 + its draft, or the chunk's length to score); final hidden states
            # [len, H] of the chunks that feed the MTP layer
            rows, hidden = self._forward(chunks, drafting)
            results = self._sample(chunks, rows)
            for chunk, result in zip(chunks, results):
                chunk.request.seq.length -= len(chunk.draft) - result.accepted  # rejected drafts' entries given back
            if any(drafting):
                self.drafter.propose(chunks, starts, hidden, results)
        return results

    def _sample(self, chunks: list[PlannedChunk], rows: list[torch.Tensor]) -> list[ChunkResult]:
        greedy_rows = [i for i, c in enumerate(chunks) if c.samples and c.request.params.temperature == 0]
        greedy = {}
        if greedy_rows:  # one argmax for every greedy request of the step (every position it verifies)
            picked = argmax_rows(torch.cat([rows[i][-1 - len(chunks[i].draft) :] for i in greedy_rows])).tolist()
            for i in greedy_rows:
                n = 1 + len(chunks[i].draft)
                greedy[i], picked = picked[:n], picked[n:]
        results = []
        for i, chunk in enumerate(chunks):
            if chunk.request.is_score:
                results.append(ChunkResult(scores=_score_chunk(chunk, rows[i])))
            elif not chunk.samples:
                results.append(ChunkResult())
            else:
                req = chunk.request
                tokens, accepted = decode_tokens(req, chunk, rows[i], greedy.get(i))
                if req.params.logprobs is not None:
                    for j, token in enumerate(tokens):  # token j was predicted at the chunk's j-th sampled position
                        req.token_logprobs.append(_token_logprob(rows[i][j], token, req.params.logprobs))
                results.append(ChunkResult(token=tokens[0], extra=tokens[1:], accepted=accepted))
        return results

    def _forward(
        self, chunks: list[PlannedChunk], drafting: list[bool]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        groups = _split_by_tokens([len(c.token_ids) for c in chunks], self.micro_batches)
        stages, spans, device = [], [], self.model.device
        for group in groups:
            batch = StepBatch.build(
                [SequenceChunk(chunks[i].request.seq, chunks[i].token_ids) for i in group], self.cache
            )
            index, span = _logit_rows([chunks[i] for i in group], batch)
            hidden_index, hidden_span = _hidden_rows([chunks[i] for i in group], [drafting[i] for i in group], batch)
            spans.append((span, hidden_span))
            stages.append(
                self.model.forward_stages(
                    batch.to(device),
                    self.cache,
                    logit_index=index.to(device),
                    hidden_index=hidden_index.to(device) if hidden_span else None,
                )
            )
        outputs = run_interleaved(stages)
        rows: list[torch.Tensor | None] = [None] * len(chunks)
        hidden: list[torch.Tensor | None] = [None] * len(chunks)
        for group, out, (span, hidden_span) in zip(groups, outputs, spans):
            out, states = (out[0].cpu(), out[1]) if hidden_span else (out.cpu(), None)  # [N, V], [M, H]
            for i, (start, stop) in zip(group, span):
                rows[i] = out[start:stop]
            for i, (start, stop) in zip(group, hidden_span or []):
                hidden[i] = states[start:stop] if stop > start else None
        return rows, hidden


def _logit_rows(chunks: list[PlannedChunk], batch: StepBatch) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Flat token indices whose logits the chunks need (the last token; every token of a score chunk) and each
    chunk's [start, stop) among them."""
    index, spans, offset = [], [], 0
    for chunk, last in zip(chunks, batch.last_index.tolist()):
        n = len(chunk.token_ids) if chunk.request.is_score else 1 + len(chunk.draft)
        index.extend(range(last - n + 1, last + 1))
        spans.append((offset, offset + n))
        offset += n
    return torch.tensor(index, dtype=torch.int64), spans


def _hidden_rows(
    chunks: list[PlannedChunk], drafting: list[bool], batch: StepBatch
) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    """Flat token indices whose final hidden states the MTP layer reads (every token of a drafting chunk) and
    each chunk's [start, stop) among them; (empty, None) when no chunk drafts."""
    if not any(drafting):
        return torch.empty(0, dtype=torch.int64), None
    index, spans = [], []
    for chunk, wants, last in zip(chunks, drafting, batch.last_index.tolist()):
        n = len(chunk.token_ids) if wants else 0
        spans.append((len(index), len(index) + n))
        index.extend(range(last - n + 1, last + 1))
    return torch.tensor(index, dtype=torch.int64), spans


def _score_chunk(chunk: PlannedChunk, logits: torch.Tensor) -> list[PositionScore]:
    """logits [n, V] at prompt positions fed..fed+n-1 -> scores of the prompt tokens they predict."""
    req, start = chunk.request, chunk.request.fed
    out = [PositionScore(req.prompt[0], None, [])] if start == 0 else []
    logprobs = logits.log_softmax(-1)  # [n, V]
    targets = req.prompt[start + 1 : start + 1 + logprobs.shape[0]]
    k = req.score_top_k or 0
    top = torch.topk(logprobs[: len(targets)], k) if k else None
    for j, token in enumerate(targets):
        alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
        out.append(PositionScore(token, float(logprobs[j, token]), alternatives))
    return out


def _token_logprob(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The sampled token's logprob under the model's distribution (the logits row it was sampled from, before
    temperature or cuts), and the top-k alternatives."""
    logprobs = logits.to(torch.float32).log_softmax(-1)
    top = torch.topk(logprobs, min(k, logprobs.shape[-1])) if k else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[token]), alternatives


def _step_span(plan: StepPlan):
    """A step serves several requests: its span is a child of the first traced one and links the others."""
    traced = [c.request.span_context for c in plan.chunks if c.request.span_context is not None]
    parent = trace.set_span_in_context(NonRecordingSpan(traced[0])) if traced else None
    return tracer().start_as_current_span("gateway.step", context=parent, links=[Link(c) for c in traced[1:]])


def _split_by_tokens(tokens: list[int], parts: int) -> list[list[int]]:
    """Chunk indices dealt into at most `parts` non-empty groups of similar token counts, each keeping order."""
    parts = max(1, min(parts, len(tokens)))
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for r in sorted(range(len(tokens)), key=lambda r: -tokens[r]):
        g = load.index(min(load))
        groups[g].append(r)
        load[g] += tokens[r]
    return [sorted(g) for g in groups if g]
