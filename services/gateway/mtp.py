"""DeepSeek-V3's multi-token-prediction (MTP) layer, as the checkpoint stores it (layer index num_hidden_layers).

Given the main model's final hidden state h_i (after its final norm) and the next token t_{i+1}:

    x = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])      embedding first, as vLLM and SGLang feed it
    x = decoder block (MLA over its own latent cache layer, MoE: router, shared experts, routed experts)
    logits = shared_head.head(shared_head.norm(x))          a guess at t_{i+2}

The block's entry for pair i sits in the cache at the slot of position i (cache layer num_hidden_layers), and
its routed experts are reached through the same experts seam as every MoE layer (layer num_hidden_layers).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from services.attention.batch import StepBatch
from services.attention.kv_cache import PagedLatentCache
from services.errors import CheckpointError, ConfigError
from services.format.checkpoint import CheckpointReader
from services.format.tensor_names import TensorSpec, layer_prefix, mtp_specs, stored_name
from services.gateway.model import DecoderLayer, GatewayModel, build_layer, load_tensor
from services.math.layers import linear, rms_norm
from services.math.packed_linear import Linear


@dataclass
class MTPModule:
    index: int  # its layer index: num_hidden_layers
    embed: torch.Tensor  # [V, H] (the main model's own tensor when the stored copy equals it)
    enorm: torch.Tensor  # [H]
    hnorm: torch.Tensor  # [H]
    eh_proj: Linear  # [H, 2H]
    block: DecoderLayer
    head_norm: torch.Tensor  # [H] shared_head.norm
    head: Linear  # [V, H] shared_head.head (the main lm_head when the stored copy equals it)

    @classmethod
    def load(
        cls,
        reader: CheckpointReader,
        model: GatewayModel,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        absorb: bool = True,
    ) -> MTPModule:
        """Read the first MTP layer's tensors but its routed experts, checked like every layer's. A config without
        an MTP layer is a ConfigError; one that declares it while the checkpoint lacks a tensor of it, a
        CheckpointError naming that tensor."""
        cfg = reader.config
        specs = check_weights(reader, with_experts=False)
        index = cfg.mtp_layers[0]
        prefix = f"{layer_prefix(index)}."
        w = {spec.name.removeprefix(prefix): load_tensor(reader, spec, dtype, device) for spec in specs}
        embed = _shared(w.pop("embed_tokens"), model.embed)
        head = w.pop("shared_head.head")
        main_head = model.lm_head.weight
        head = model.lm_head if main_head is not None and torch.equal(head, main_head) else Linear(head)
        return cls(
            index=index,
            embed=embed,
            enorm=w.pop("enorm"),
            hnorm=w.pop("hnorm"),
            eh_proj=Linear(w.pop("eh_proj")),
            head_norm=w.pop("shared_head.norm"),
            head=head,
            block=build_layer(cfg, index, w, absorb),
        )

    @torch.inference_mode()
    def forward_stages(
        self,
        model: GatewayModel,
        batch: StepBatch,
        cache: PagedLatentCache,
        hidden: torch.Tensor,
        logit_index: torch.Tensor,
        with_hidden: bool = False,
    ) -> Generator[None, None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """batch: the next tokens t_{i+1} at positions i; hidden [T, H]: the main model's final hidden states h_i
        at those positions. Writes the block's latent cache entries; -> logits [N, V] fp32 at `logit_index` [N]
        (the guesses at t_{i+2}), and `with_hidden` the block's output after shared_head.norm there [N, H] (what
        a further application of the layer reads in place of h). Pauses while the block's routed experts are
        computed, as the main layers do."""
        eps = model.cfg.rms_norm_eps
        x = self._block_input(batch, hidden, eps)  # [T, H]
        rotation = model.rotary.rotation(batch.positions)
        x = yield from model.layer_stages(self.block, x, batch, cache, rotation)
        out = rms_norm(x[logit_index], self.head_norm, eps)  # [N, H]
        logits = linear(out, self.head).to(torch.float32)
        return (logits, out) if with_hidden else logits

    @torch.inference_mode()
    def feed(self, model: GatewayModel, batch: StepBatch, cache: PagedLatentCache, hidden: torch.Tensor) -> None:
        """Only the block's latent cache entries for the pairs (those forward_stages writes, the same values),
        without its attention, experts or head: for positions after which no guess is wanted (prompt positions
        short of the last, requests not drafting while the batch is large), so that later guesses can attend to
        them."""
        eps = model.cfg.rms_norm_eps
        x = rms_norm(self._block_input(batch, hidden, eps), self.block.input_norm, eps)  # [T, H]
        rotation = model.rotary.rotation(batch.positions)
        self.block.attention.write_latents(x, batch, cache, self.block.index, rotation)

    def _block_input(self, batch: StepBatch, hidden: torch.Tensor, eps: float) -> torch.Tensor:
        """eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]) -> [T, H]."""
        e = rms_norm(self.embed[batch.token_ids], self.enorm, eps)  # [T, H]
        h = rms_norm(hidden.to(e.dtype), self.hnorm, eps)  # [T, H]
        return linear(torch.cat((e, h), dim=-1), self.eh_proj)


def check_weights(reader: CheckpointReader, with_experts: bool = True) -> list[TensorSpec]:
    """The first MTP layer's tensor specs, after checking the checkpoint has them all: ConfigError when config.json
    declares no MTP layer, CheckpointError naming the first missing tensor when it declares one the weights lack."""
    cfg = reader.config
    if not cfg.mtp_layers:
        raise ConfigError(
            "num_nextn_predict_layers", "is 0: this model has no MTP layer to draft with (run without MTP)"
        )
    index = cfg.mtp_layers[0]
    specs = mtp_specs(cfg, index, with_experts)
    for spec in specs:
        if stored_name(spec) not in reader:
            raise CheckpointError(
                stored_name(spec),
                f"missing: config.json declares an MTP layer "
                f"(num_nextn_predict_layers {cfg.num_nextn_predict_layers}, layer {index}) but the "
                f"checkpoint in {reader.directory} lacks its weights; run without MTP",
            )
    return [spec for spec in specs if spec.expert is None]


def _shared(copy: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """The main model's tensor where the MTP layer's stored copy equals it (one copy in memory, as DeepSeek-V3's
    MTP shares the embedding and head in training), else the copy."""
    return main if copy.shape == main.shape and torch.equal(copy, main) else copy
