"""Training the multi-token-prediction layer of a trained model: the main model frozen, DeepSeek-V3's MTP loss.

For a window t_0..t_{T-1}: the main model's final hidden states h_i (after its final norm, as served), then
    x_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]) -> the MTP decoder block (causal over i) -> shared head
and the loss is the cross-entropy of t_{i+2}, i = 0..T-3 (the paper's L_MTP with D = 1). Trained: enorm, hnorm,
eh_proj, the block (attention, norms, router, shared and routed experts); the routing bias follows the same
auxiliary-loss-free balancing as the main layers'. The embedding and head stay the main model's (the checkpoint
stores copies of them), as DeepSeek-V3 shares them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from services.format.tensor_names import stored_name
from services.math.layers import rms_norm
from services.training.corpus import TRAIN_MODULES, corpus_ids
from services.training.forward import TrainingModel
from services.training.trainer import StepFn, TrainConfig, TrainResult, learning_rate, update_routing_bias, write_model


def mtp_parameters(model: TrainingModel) -> list[torch.Tensor]:
    """The first MTP layer's own tensors (not its embedding/head copies nor its routing bias), set to train; every
    other tensor frozen."""
    cfg = model.cfg
    layer = cfg.mtp_layers[0]
    prefix = f"model.layers.{layer}."
    shared = {prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"}
    own = {stored_name(s) for s in model.specs if s.layer == layer} - shared
    trained = []
    for name, tensor in model.params.items():
        on = name in own and not name.endswith("e_score_correction_bias")
        tensor.requires_grad_(on)
        if on:
            trained.append(tensor)
    return trained


@torch.no_grad()
def final_hidden(model: TrainingModel, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> the main model's hidden states after its final norm [B, T, H] (what the MTP layer reads)."""
    cfg, p = model.cfg, model.params
    b, t = ids.shape
    x = p["model.embed_tokens.weight"][ids]
    rotation = model.rotary.rotation(torch.arange(t))
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        x = x + model.attention(layer, rms_norm(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps), rotation)
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps).reshape(b * t, -1)
        ffn = model.moe(layer, h, None) if cfg.is_moe_layer(layer) else model.mlp(pre + "mlp.", h)
        x = x + ffn.view(b, t, -1)
    return rms_norm(x, p["model.norm.weight"], cfg.rms_norm_eps)


def mtp_logits(
    model: TrainingModel, hidden: torch.Tensor, next_ids: torch.Tensor, loads: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """hidden [B, S, H] (h_i), next_ids [B, S] (t_{i+1}) at positions 0..S-1 -> logits [B, S, V] (guesses at
    t_{i+2})."""
    cfg, p = model.cfg, model.params
    layer = cfg.mtp_layers[0]
    pre, eps = f"model.layers.{layer}.", cfg.rms_norm_eps
    b, s = next_ids.shape
    e = rms_norm(p[pre + "embed_tokens.weight"][next_ids], p[pre + "enorm.weight"], eps)
    x = F.linear(torch.cat((e, rms_norm(hidden, p[pre + "hnorm.weight"], eps)), dim=-1), p[pre + "eh_proj.weight"])
    rotation = model.rotary.rotation(torch.arange(s))
    x = x + model.attention(layer, rms_norm(x, p[pre + "input_layernorm.weight"], eps), rotation)
    h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], eps).reshape(b * s, -1)
    x = x + model.moe(layer, h, loads).view(b, s, -1)
    return F.linear(rms_norm(x, p[pre + "shared_head.norm.weight"], eps), p[pre + "shared_head.head.weight"])


def mtp_loss(model: TrainingModel, ids: torch.Tensor, loads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy of t_{i+2} from (h_i, t_{i+1}) over ids [B, T]."""
    hidden = final_hidden(model, ids)[:, :-2]  # [B, T-2, H]
    logits = mtp_logits(model, hidden, ids[:, 1:-1], loads)  # [B, T-2, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))


def train_mtp(model: TrainingModel, ids: torch.Tensor, tc: TrainConfig, on_step: StepFn | None = None) -> list[float]:
    """`tc.steps` AdamW steps of the MTP loss on random `seq_len`-token windows of ids [N], main model frozen."""
    torch.manual_seed(tc.seed)
    params = mtp_parameters(model)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(tc.seed)
    losses = []
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, step)
        starts = torch.randint(0, ids.numel() - tc.seq_len - 1, (tc.batch,), generator=gen)
        x = torch.stack([ids[i : i + tc.seq_len] for i in starts.tolist()])  # [B, T]
        loads: dict[int, torch.Tensor] = {}
        loss = mtp_loss(model, x, loads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routing_bias(model, loads, tc.bias_rate)
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, tc.steps, losses[-1])
    return losses


def write_mtp_trained_model(
    source: str | Path, directory: str | Path, tc: TrainConfig = TrainConfig(), on_step: StepFn | None = None
) -> TrainResult:
    """`source` (a trained checkpoint with an MTP layer) with its MTP layer trained `tc.steps` steps on
    TRAIN_MODULES, main model unchanged, written to `directory`."""
    model = TrainingModel.from_checkpoint(source)
    if not model.cfg.mtp_layers:
        raise ValueError(f"{source}: config.json declares no MTP layer (num_nextn_predict_layers 0)")
    ids = torch.tensor([t for module in corpus_ids(Path(source), TRAIN_MODULES) for t in module])  # [N]
    began = time.perf_counter()
    losses = train_mtp(model, ids, tc, on_step)
    seconds = time.perf_counter() - began
    write_model(model, Path(directory), Path(source))
    return TrainResult(Path(directory), tc.steps, losses, seconds)
