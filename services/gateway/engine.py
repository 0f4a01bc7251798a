"""The in-process engine: the serving core with the routed experts in this process, driven synchronously.

What `expertmesh generate/score --model`, the tests and the benchmarks use. Generation runs the same
continuous-batching scheduler and runner the gateway server runs, in the caller's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.expert.local import LocalExperts
from services.expert.store import ExpertStore
from services.format.checkpoint import CheckpointReader
from services.gateway.config import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_TOKENS
from services.gateway.mtp import check_weights as check_mtp_weights
from services.gateway.requests import PositionScore, Request, RequestEvent
from services.gateway.sampling import SamplingParams
from services.gateway.serving import ServingCore
from services.gateway.stop_strings import OutputText
from services.math.device import resolve_device, serving_dtype

__all__ = ["Engine", "Generation", "PositionScore"]


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"
    draft_tokens: int = 0  # MTP drafts verified for this generation
    accepted_tokens: int = 0  # of them, accepted


class Engine:
    def __init__(self, core: ServingCore):
        self.core = core
        self.model, self.cfg, self.cache = core.model, core.cfg, core.cache
        self.scheduler, self.tokenizer, self.max_context = core.scheduler, core.tokenizer, core.max_context

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        absorb: bool = True,
        cache_dense_experts: bool = True,
        progress=None,
        fp8_experts: bool | None = None,
        mtp: bool = False,
        **core_options,
    ) -> Engine:
        """`device`: cpu, cuda or auto (services.math.device); `dtype` defaults to the device's serving dtype
        (float32 on cpu, bfloat16 on cuda, where the experts stay FP8: `fp8_experts`, see ExpertStore). `mtp`:
        speculative decoding with the checkpoint's MTP layer (its experts are loaded only then)."""
        core_options.setdefault("max_waiting", 1 << 40)  # in process the caller holds every prompt already
        device = resolve_device(device)
        dtype = dtype or serving_dtype(device)
        store = ExpertStore(
            CheckpointReader(model_dir),
            dtype=dtype,
            cache_dense=cache_dense_experts,
            device=device,
            fp8_compute=fp8_experts,
        )
        cfg = store.cfg
        if mtp:  # before any expert is read: a missing MTP tensor is named as such
            check_mtp_weights(store.reader)
        layers = cfg.moe_layers if mtp else [layer for layer in cfg.moe_layers if layer not in cfg.mtp_layers]
        experts = LocalExperts.load_all(
            store, progress=progress and (lambda d, t: progress("experts", d, t)), layers=layers
        )
        core = ServingCore.from_dir(
            model_dir,
            experts,
            dtype=dtype,
            device=device,
            cache_tokens=cache_tokens,
            block_size=block_size,
            absorb=absorb,
            mtp=mtp,
            progress=progress and (lambda d, t: progress("layers", d, t)),
            **core_options,
        )
        return cls(core)

    def encode(self, text: str) -> list[int]:
        return self.core.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.core.decode(token_ids)

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        self.core.check_request(prompt, params)

    def score(self, token_ids: list[int], top_k: int = 0) -> list[PositionScore]:
        """Log-probability of each token given the ones before, and the top-k alternatives at each position."""
        self.core.check_score(token_ids, top_k)
        req = Request(list(token_ids), score_top_k=top_k)
        self._run([req])
        return req.scores

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Generation]:
        """Continuous batching over all prompts at once. `on_text(i, piece)` is given prompt i's text piece by piece
        as its tokens are made (the pieces add up to the decoded output)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.core.check_request(prompt, p)
        requests = [Request(list(prompt), p) for prompt, p in zip(prompts, params_list)]
        if on_text is not None:
            for i, req in enumerate(requests):
                req.on_event = self._text_events(i, on_text)
        self._run(requests)
        return [Generation(r.prompt, r.output, r.finish_reason, r.draft_tokens, r.accepted_tokens) for r in requests]

    def _text_events(self, index: int, on_text: Callable[[int, str], None]) -> Callable[[RequestEvent], None]:
        text = OutputText(self.core.tokenizer)

        def on_event(event: RequestEvent) -> None:
            piece = text.step(event.token_id, last=event.finish_reason is not None)
            if piece:
                on_text(index, piece)

        return on_event

    def _run(self, requests: list[Request]) -> None:
        for req in requests:
            self.core.submit(req)
        self.core.run_until_idle()
        for req in requests:
            if req.error is not None:
                raise req.error
