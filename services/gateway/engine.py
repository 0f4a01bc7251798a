"""The in-process engine: a GatewayModel, its paged latent cache and the tokenizer, with score and generate.

Generation runs the gateway's continuous-batching scheduler in the caller's thread: prompts prefill in
packed chunks of different lengths, then every live sequence decodes one token per step together until it
stops (EOS, a stop token, or max_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from services.attention.batch import SequenceChunk, StepBatch
from services.attention.kv_cache import PagedLatentCache, SequenceBlocks
from services.format.checkpoint import CheckpointReader
from services.format.config import ModelConfig
from services.errors import InvalidRequestError
from services.math.experts import ExpertsBackend
from services.format.tokenizer import load_tokenizer
from services.expert.local import LocalExperts
from services.expert.store import ExpertStore
from services.gateway.model import GatewayModel
from services.gateway.sampling import SamplingParams
from services.gateway.scheduler import Request, Scheduler

DEFAULT_CACHE_TOKENS = 32768
DEFAULT_BLOCK_SIZE = 64


@dataclass
class PositionScore:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"


class Engine:
    def __init__(self, model: GatewayModel, cache: PagedLatentCache, tokenizer=None, max_context: int | None = None):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.cache = cache
        self.tokenizer = tokenizer
        self.max_context = max_context or min(self.cfg.max_position_embeddings, cache.num_blocks * cache.block_size)
        self.scheduler = Scheduler(model, cache, self.cfg.eos_token_ids)

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 cache_tokens: int = DEFAULT_CACHE_TOKENS, block_size: int = DEFAULT_BLOCK_SIZE,
                 experts: ExpertsBackend | None = None, absorb: bool = True, cache_dense_experts: bool = True,
                 progress=None) -> "Engine":
        reader = CheckpointReader(model_dir)
        if experts is None:
            store = ExpertStore(reader, dtype=dtype, cache_dense=cache_dense_experts, device=device)
            experts = LocalExperts.load_all(store, progress=progress and (lambda d, t: progress("experts", d, t)))
        model = GatewayModel.load(reader, experts, dtype=dtype, device=device, absorb=absorb,
                                  progress=progress and (lambda d, t: progress("layers", d, t)))
        cache = PagedLatentCache(reader.config, -(-cache_tokens // block_size), block_size, dtype=dtype, device=device)
        return cls(model, cache, load_tokenizer(model_dir))

    # ---- input checks ----------------------------------------------------------------------------------
    def check_tokens(self, token_ids: list[int], extra: int = 0) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(token_ids) + extra > self.max_context:
            raise InvalidRequestError(f"prompt of {len(token_ids)} tokens plus {extra} new ones exceeds the context "
                                      f"of {self.max_context} tokens")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer.json: pass token ids")
        if not text:
            raise InvalidRequestError("the prompt is empty")
        return self.tokenizer.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    # ---- score -------------------------------------------------------------------------------------------
    def score(self, token_ids: list[int], top_k: int = 0) -> list[PositionScore]:
        """Log-probability of each token given the ones before, and the top-k alternatives at each position."""
        self.check_tokens(token_ids)
        seq = SequenceBlocks()
        try:
            batch = StepBatch.build([SequenceChunk(seq, list(token_ids))], self.cache).to(self.model.device)
            logprobs = self.model.forward(batch, self.cache, all_logits=True).log_softmax(-1).cpu()  # [T, V]
        finally:
            self.cache.release(seq)
        out = [PositionScore(token_ids[0], None, [])]
        for i in range(1, len(token_ids)):
            row = logprobs[i - 1]
            top = torch.topk(row, top_k) if top_k else None
            out.append(PositionScore(token_ids[i], float(row[token_ids[i]]),
                                     list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
        return out

    # ---- generate ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Generation]:
        """Continuous batching over all prompts at once (the same scheduler the gateway server runs)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.check_request(prompt, p)
        requests = [Request(list(prompt), p) for prompt, p in zip(prompts, params_list)]
        for req in requests:
            self.scheduler.submit(req)
        self.scheduler.run_until_idle()
        for req in requests:
            if req.error is not None:
                raise req.error
        return [Generation(r.prompt, r.output, r.finish_reason) for r in requests]

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        params.validate(self.max_context)
        self.check_tokens(prompt, params.max_tokens)
        blocks = -(-(len(prompt) + params.max_tokens) // self.cache.block_size)
        if blocks > self.cache.num_blocks:
            raise InvalidRequestError(f"prompt plus max_tokens needs {blocks} cache blocks, the cache has {self.cache.num_blocks}")
