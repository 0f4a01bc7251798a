"""The gateway's part of DeepSeek-V3: everything but the routed experts, which it reaches through the experts seam.

embed -> for each layer: x += MLA(norm(x)); x += FFN(norm(x)) -> norm -> lm_head. FFN is dense SwiGLU for the
first `first_k_dense_replace` layers and MoE after: router, shared experts (local), routed experts (backend).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from services.attention.batch import StepBatch
from services.attention.kv_cache import PagedLatentCache
from services.attention.mla import MLA, MLAWeights
from services.attention.rope import Rotary
from services.format.checkpoint import CheckpointReader
from services.format.config import ModelConfig
from services.format.tensor_names import Kind, TensorSpec, layer_specs
from services.format.weights import read_linear, read_plain
from services.gateway.router import Router
from services.gateway.thread_burst import ThreadBurst
from services.math.experts import ExpertsBackend
from services.math.layers import linear, rms_norm, swiglu
from services.math.packed_linear import Linear


@dataclass
class SwiGLUWeights:
    gate_up: Linear  # [2I, H]
    down: Linear  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up, self.down)


@dataclass
class DecoderLayer:
    index: int
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    attention: MLA
    dense: SwiGLUWeights | None  # dense layers
    router: Router | None  # MoE layers
    shared: SwiGLUWeights | None  # MoE layers with shared experts


class GatewayModel:
    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        norm: torch.Tensor,
        lm_head: Linear,
        experts: ExpertsBackend,
        device: torch.device | str = "cpu",
        routing_observer: Callable[[int, torch.Tensor], None] | None = None,
        burst_threads: int = 0,
    ):
        self.cfg = cfg
        self.embed = embed  # [V, H]
        self.layers = layers
        self.norm = norm  # [H]
        self.lm_head = lm_head  # [V, H]
        self.experts = experts
        self.rotary = Rotary(cfg, device)
        self.dtype = embed.dtype
        self.device = torch.device(device)
        self.routing_observer = routing_observer  # called with (layer, topk_idx [T, K]) every MoE layer (load)
        self.threads = ThreadBurst(burst_threads)  # more threads while no routed-expert call is out

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        reader: CheckpointReader,
        experts: ExpertsBackend,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        absorb: bool = True,
        progress=None,
        routing_observer: Callable[[int, torch.Tensor], None] | None = None,
        burst_threads: int = 0,
    ) -> GatewayModel:
        """Read every non-routed-expert tensor (FP8 projections dequantized into `dtype`)."""
        cfg = reader.config

        def tensor(spec: TensorSpec) -> torch.Tensor:
            return load_tensor(reader, spec, dtype, device)

        embed = tensor(TensorSpec("model.embed_tokens", (cfg.vocab_size, cfg.hidden_size), Kind.EMBED))
        layers = []
        for i in range(cfg.num_hidden_layers):
            w = {
                spec.name.removeprefix(f"model.layers.{i}."): tensor(spec)
                for spec in layer_specs(cfg, i, with_experts=False)
            }
            layers.append(build_layer(cfg, i, w, absorb))
            if progress:
                progress(i + 1, cfg.num_hidden_layers)
        norm = tensor(TensorSpec("model.norm", (cfg.hidden_size,), Kind.NORM))
        lm_head = tensor(TensorSpec("lm_head", (cfg.vocab_size, cfg.hidden_size), Kind.EMBED))
        return cls(cfg, embed, layers, norm, Linear(lm_head), experts, device, routing_observer, burst_threads)

    def set_absorb(self, absorb: bool) -> None:
        for layer in self.layers:
            layer.attention.absorb = absorb

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        batch: StepBatch,
        cache: PagedLatentCache,
        all_logits: bool = False,
        routing_trace: list | None = None,
        logit_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step. -> logits [B, V] at each sequence's last new token (or [T, V] with `all_logits`, or [N, V]
        at the flat token indices `logit_index` [N]), fp32.

        `routing_trace`, when given, receives (layer, topk_idx [T, K]) for every MoE layer.
        """
        return run_interleaved([self.forward_stages(batch, cache, all_logits, routing_trace, logit_index)])[0]

    @torch.inference_mode()
    def forward_stages(
        self,
        batch: StepBatch,
        cache: PagedLatentCache,
        all_logits: bool = False,
        routing_trace: list | None = None,
        logit_index: torch.Tensor | None = None,
        hidden_index: torch.Tensor | None = None,
    ) -> Generator[None, None, torch.Tensor]:
        """The forward pass as a generator that pauses while each MoE layer's routed experts are computed
        elsewhere: another micro-batch's attention can run meanwhile (see `run_interleaved`).

        With `hidden_index` [M] it returns (logits, hidden [M, H]): the final hidden states (after the final norm,
        what the MTP layer reads) at those flat token indices."""
        cfg = self.cfg
        self.threads.begin()  # until the first expert call
        x = self.embed[batch.token_ids]  # [T, H]
        rotation = self.rotary.rotation(batch.positions)  # [T, R/2] complex
        for layer in self.layers:
            x = yield from self.layer_stages(layer, x, batch, cache, rotation, routing_trace)
        self.threads.begin()  # after the last answer
        try:
            if hidden_index is not None:
                index = logit_index if logit_index is not None else batch.last_index
                hidden = rms_norm(x[hidden_index], self.norm, cfg.rms_norm_eps)  # [M, H]
                logits = linear(rms_norm(x[index], self.norm, cfg.rms_norm_eps), self.lm_head)
                return logits.to(torch.float32), hidden
            if logit_index is not None:
                x = x[logit_index]  # [N, H]
            elif not all_logits:
                x = x[batch.last_index]  # [B, H]
            return linear(rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head).to(torch.float32)
        finally:
            self.threads.end()

    def layer_stages(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        batch: StepBatch,
        cache: PagedLatentCache,
        rotation: torch.Tensor,
        routing_trace: list | None = None,
    ) -> Generator[None, None, torch.Tensor]:
        """One decoder layer (x [T, H] -> [T, H]), pausing while its routed experts are computed elsewhere."""
        eps = self.cfg.rms_norm_eps
        x = x + layer.attention.forward(rms_norm(x, layer.input_norm, eps), batch, cache, layer.index, rotation)
        h = rms_norm(x, layer.post_attention_norm, eps)
        if layer.dense is not None:
            return x + layer.dense(h)
        topk_idx, topk_w = layer.router(h)  # [T, K], [T, K]
        if routing_trace is not None:
            routing_trace.append((layer.index, topk_idx))
        if self.routing_observer is not None:
            self.routing_observer(layer.index, topk_idx)
        self.threads.end()  # the pools compute from here
        self.threads.calls_out += 1
        try:
            pending = self.experts.start(layer.index, h, topk_idx, topk_w)
            shared = layer.shared(h) if layer.shared is not None else 0  # overlaps the remote call
            yield
            routed = pending()
        finally:
            self.threads.calls_out -= 1
        return x + routed + shared  # [T, H]


def load_tensor(
    reader: CheckpointReader, spec: TensorSpec, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """One non-expert tensor in the compute dtype on `device` (FP8 projections dequantized), checked against its
    spec."""
    if spec.kind is Kind.LINEAR:
        return read_linear(reader, spec).dense(dtype).to(device)
    return read_plain(reader, spec, dtype).to(device)


def run_interleaved(stages: list[Generator[None, None, torch.Tensor]]) -> list[torch.Tensor]:
    """Drive several forward passes (micro-batches) round-robin, each to its next pause: while one waits for
    its experts, the others compute. Returns each pass's result in order."""
    results: list[torch.Tensor | None] = [None] * len(stages)
    live = list(range(len(stages)))
    while live:
        for i in list(live):
            try:
                next(stages[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results


def build_layer(cfg: ModelConfig, index: int, w: dict[str, torch.Tensor], absorb: bool) -> DecoderLayer:
    """A decoder layer from its tensors, keyed by name within the layer (`self_attn.q_a_proj`, `mlp.gate`, ...)."""
    attn = MLA(
        cfg,
        MLAWeights(
            q_a=w.get("self_attn.q_a_proj"),
            q_a_norm=w.get("self_attn.q_a_layernorm"),
            q_b=Linear(w["self_attn.q_b_proj"] if cfg.q_lora_rank else w["self_attn.q_proj"]),
            kv_a=w["self_attn.kv_a_proj_with_mqa"],
            kv_a_norm=w["self_attn.kv_a_layernorm"],
            kv_b=w["self_attn.kv_b_proj"],
            o=Linear(w["self_attn.o_proj"]),
        ),
        absorb=absorb,
    )

    def mlp(prefix: str) -> SwiGLUWeights:
        gate_up = torch.cat((w[f"{prefix}.gate_proj"], w[f"{prefix}.up_proj"]))
        return SwiGLUWeights(Linear(gate_up), Linear(w[f"{prefix}.down_proj"]))

    moe = cfg.is_moe_layer(index)
    return DecoderLayer(
        index=index,
        input_norm=w["input_layernorm"],
        post_attention_norm=w["post_attention_layernorm"],
        attention=attn,
        dense=None if moe else mlp("mlp"),
        router=Router(cfg, w["mlp.gate"], w["mlp.gate.e_score_correction_bias"]) if moe else None,
        shared=mlp("mlp.shared_experts") if moe and cfg.n_shared_experts else None,
    )
