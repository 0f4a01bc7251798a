"""The serving core: one model with its latent cache, tokenizer, scheduler and runner, stepped by one thread.

Front ends (the gRPC servicer, the in-process `Engine`) check requests here, submit them, and read their
events. A step is: the scheduler plans it, the runner executes it, the scheduler commits the results. A step
that raises fails only its own requests (the cause is logged) and serving goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.attention.kv_cache import PagedLatentCache
from services.errors import InvalidRequestError
from services.format.checkpoint import CheckpointReader
from services.format.config import ModelConfig
from services.format.tokenizer import load_tokenizer
from services.gateway.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CACHE_TOKENS,
    DEFAULT_MAX_DECODE_STALL,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_MAX_WAITING,
    DEFAULT_MTP_MAX_BATCH,
    DEFAULT_PREFIX_CACHING,
)
from services.gateway.model import GatewayModel
from services.gateway.mtp import MTPModule
from services.gateway.requests import Request
from services.gateway.runner import ModelRunner
from services.gateway.sampling import SamplingParams
from services.gateway.scheduler import Scheduler
from services.gateway.speculative import MTPDrafter
from services.math.experts import ExpertsBackend

log = logging.getLogger(__name__)


class ServingCore:
    def __init__(
        self,
        model: GatewayModel,
        cache: PagedLatentCache,
        tokenizer=None,
        *,
        max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_waiting: int = DEFAULT_MAX_WAITING,
        micro_batches: int = 1,
        before_step: Callable[[], None] | None = None,
        on_finish: Callable[[Request], None] | None = None,
        drafter: MTPDrafter | None = None,
        mtp_max_batch: int = DEFAULT_MTP_MAX_BATCH,
        max_decode_stall: float = DEFAULT_MAX_DECODE_STALL,
    ):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.cache = cache
        self.tokenizer = tokenizer
        self.max_context = min(self.cfg.max_position_embeddings, cache.num_blocks * cache.block_size)
        self.scheduler = Scheduler(
            cache,
            self.cfg.eos_token_ids,
            max_step_tokens,
            max_running,
            max_waiting,
            mtp_max_batch=mtp_max_batch,
            max_decode_stall=max_decode_stall,
        )
        self.scheduler.on_finish = on_finish  # e.g. count finished requests and their tokens
        self.runner = ModelRunner(model, cache, micro_batches, drafter)
        self.before_step = before_step  # e.g. switch to a new placement at a step boundary

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        experts: ExpertsBackend,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_caching: bool = DEFAULT_PREFIX_CACHING,
        absorb: bool = True,
        routing_observer=None,
        progress=None,
        mtp: bool = False,
        num_speculative_tokens: int = 1,
        burst_threads: int = 0,
        **core_options,
    ) -> ServingCore:
        """Load the gateway's part of the checkpoint (everything but the routed experts, reached via `experts`);
        with `mtp`, its MTP layer too, which drafts for speculative decoding (its experts through `experts` as well,
        layer num_hidden_layers). `burst_threads`: torch threads while no routed-expert call is out (thread_burst.py;
        0: off)."""
        reader = CheckpointReader(model_dir)
        model = GatewayModel.load(
            reader,
            experts,
            dtype=dtype,
            device=device,
            absorb=absorb,
            routing_observer=routing_observer,
            progress=progress,
            burst_threads=burst_threads,
        )
        cache = PagedLatentCache(
            reader.config,
            -(-cache_tokens // block_size),
            block_size,
            dtype=dtype,
            device=device,
            mtp=mtp,
            prefix_caching=prefix_caching,
        )
        drafter = None
        if mtp:
            module = MTPModule.load(reader, model, dtype=dtype, device=device, absorb=absorb)
            drafter = MTPDrafter(module, model, cache, num_speculative_tokens)
        return cls(model, cache, load_tokenizer(model_dir), drafter=drafter, **core_options)

    # ---- requests in ----------------------------------------------------------------------------------
    def check_tokens(self, token_ids: list[int], extra: int = 0) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(token_ids) + extra > self.max_context:
            raise InvalidRequestError(
                f"prompt of {len(token_ids)} tokens plus {extra} new ones exceeds the context "
                f"of {self.max_context} tokens"
            )

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        params.validate(self.max_context)
        self.check_tokens(prompt, params.max_tokens)

    def check_score(self, token_ids: list[int], top_k: int) -> None:
        self.check_tokens(token_ids)
        if not 0 <= top_k <= self.cfg.vocab_size:
            raise InvalidRequestError(f"top_k must lie in [0, {self.cfg.vocab_size}] (the vocabulary), got {top_k}")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer.json: pass token ids")
        if not text:
            raise InvalidRequestError("the prompt is empty")
        return self.tokenizer.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    def submit(self, request: Request) -> None:
        self.scheduler.submit(request)

    def cancel(self, request: Request) -> None:
        self.scheduler.cancel(request)

    # ---- stepping (one thread) ------------------------------------------------------------------------
    def step(self) -> bool:
        """Plan, execute and commit one step. Returns whether there was anything to do."""
        if self.before_step is not None:  # also when idle: a new placement is taken up without waiting for work
            self.before_step()
        plan = self.scheduler.plan()
        if not plan:
            return False
        started = time.perf_counter()
        try:
            results = self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the serving loop
            log.exception("step of %d requests failed", len(plan.chunks))
            self.scheduler.fail(plan, exc)
            return True
        self.scheduler.observe(plan, time.perf_counter() - started)  # sizes the prefill beside later decodes
        self.scheduler.commit(plan, results)
        return True

    def run_until_idle(self) -> None:
        while self.step():
            pass
