"""The expert weight store: FP8 (e4m3, 128x128 block-scaled) weights per (layer, expert), read one expert at a time.

Only the experts asked for are read from the checkpoint. Weights stay FP8 in memory; the compute form (the
fused [2I, H] gate/up and the [H, I] down projection in the compute dtype) is made on use, or kept when
`cache_dense` trades memory for speed (the CPU engine's default: dequantizing every step costs more than the
matmul itself there).

Compute forms are kept per compute dtype, each built on first use: the store's `dtype` (float32: exact) and, in
a pool serving reduced-precision dispatch, `services.dispatch.precision.reduced_compute_dtype()`.

On CUDA (`services.dispatch.precision.fp8_experts`) no dense copy is ever kept: reduced-precision compute runs
on a per-layer FP8 stack (`Fp8Experts`) whose rows the experts' own weights then view (one copy in GPU memory;
rebuilt when the layer's experts change), and float32 compute dequantizes per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cpu_routed
from services.dispatch.precision import fp8_experts
from services.errors import ExpertNotHeldError, InvalidRequestError
from services.expert.grouped import Fp8Experts, StackedExperts
from services.format.checkpoint import CheckpointReader
from services.format.tensor_names import expert_specs
from services.format.weights import LinearWeight, read_linear


@dataclass
class ExpertWeights:
    gate: LinearWeight  # [I, H]
    up: LinearWeight  # [I, H]
    down: LinearWeight  # [H, I]

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> gate_up [2I, H], down [H, I] in `dtype`."""
        return torch.cat((self.gate.dense(dtype), self.up.dense(dtype))), self.down.dense(dtype)

    def nbytes(self) -> int:
        return self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()


class ExpertStore:
    def __init__(
        self,
        reader: CheckpointReader,
        dtype: torch.dtype = torch.float32,
        cache_dense: bool = False,
        device: torch.device | str = "cpu",
        fp8_compute: bool | None = None,
    ):
        """`fp8_compute`: reduced-precision compute as FP8 grouped GEMMs (default: on CUDA; on CPU the torch
        references run, for tests). A CUDA store never keeps dense copies, whatever `cache_dense` says."""
        self.reader = reader
        self.cfg = reader.config
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache_dense = cache_dense and self.device.type != "cuda"
        self.fp8_compute = fp8_experts(self.device.type) if fp8_compute is None else fp8_compute
        self._fp8: dict[tuple[int, int], ExpertWeights] = {}
        self._fp8_stacks: dict[int, Fp8Experts] = {}  # layer -> its held experts' e4m3 stack
        self._dense: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacks: dict[tuple[int, torch.dtype], StackedExperts] = {}  # (layer, compute dtype) -> stack

    def check(self, layer: int, expert: int) -> None:
        """Raises InvalidRequestError for a (layer, expert) that the model does not have."""
        if layer not in self.cfg.moe_layers:  # the MTP layers' included
            raise InvalidRequestError(
                f"layer {layer} is not an MoE layer (MoE layers: {self.cfg.moe_layers[0]}..{self.cfg.moe_layers[-1]})"
            )
        if not 0 <= expert < self.cfg.n_routed_experts:
            raise InvalidRequestError(f"expert {expert} out of range [0, {self.cfg.n_routed_experts})")

    def load(self, layer: int, expert: int) -> ExpertWeights:
        """Read one expert (FP8 kept; BF16/FP32 checkpoints are quantized to FP8 blocks at load)."""
        self.check(layer, expert)
        key = (layer, expert)
        if key not in self._fp8:
            gate, up, down = (
                read_linear(self.reader, spec, quantize_fp8=True) for spec in expert_specs(self.cfg, layer, expert)
            )
            for lw in (gate, up, down):
                lw.weight, lw.scale_inv = lw.weight.to(self.device), lw.scale_inv.to(self.device)
            self._fp8[key] = ExpertWeights(gate, up, down)
            self._drop_compute_forms(layer, expert)
        return self._fp8[key]

    def unload(self, layer: int, expert: int) -> None:
        restack = layer in self._fp8_stacks  # the others view the old stack: re-stack them now to free its memory
        self._fp8.pop((layer, expert), None)
        self._drop_compute_forms(layer, expert)
        if restack:
            self.fp8_stacked(layer)

    def _drop_compute_forms(self, layer: int, expert: int) -> None:
        for key in [k for k in self._dense if k[:2] == (layer, expert)]:
            del self._dense[key]
        for key in [k for k in self._stacks if k[0] == layer]:
            del self._stacks[key]
        self._fp8_stacks.pop(layer, None)

    def loaded(self) -> list[tuple[int, int]]:
        return sorted(self._fp8)

    def held_mask(self, layer: int) -> torch.Tensor:
        """[E] bool: which experts of `layer` this store holds (from the layer's stack when one is built)."""
        stack = self._fp8_stacks.get(layer) or next((v for k, v in self._stacks.items() if k[0] == layer), None)
        if stack is not None:
            return stack.row_of_expert >= 0
        mask = torch.zeros(self.cfg.n_routed_experts, dtype=torch.bool)
        mask[[e for (l, e) in self._fp8 if l == layer]] = True
        return mask

    def compute_weights(
        self, layer: int, expert: int, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> gate_up [2I, H], down [H, I] in `dtype` (default: the store's)."""
        dtype = dtype or self.dtype
        stack = self._stacks.get((layer, dtype))
        if stack is not None and stack.row_of_expert[expert] >= 0:
            row = int(stack.row_of_expert[expert])
            return stack.gate_up[row], stack.down[row]
        key = (layer, expert, dtype)
        if key in self._dense:
            return self._dense[key]
        weights = self._fp8.get((layer, expert))
        if weights is None:
            raise ExpertNotHeldError(f"expert {expert} of layer {layer} is not held here")
        dense = weights.dense(dtype)
        if self.cache_dense:
            self._dense[key] = dense
        return dense

    def stacked(self, layer: int, dtype: torch.dtype | None = None) -> StackedExperts | None:
        """The layer's held experts stacked in `dtype` for batched compute (kept only with `cache_dense`)."""
        if not self.cache_dense:
            return None
        dtype = dtype or self.dtype
        if (layer, dtype) not in self._stacks:
            held = [e for (l, e) in sorted(self._fp8) if l == layer]
            if not held:
                return None
            row_of_expert = torch.full((self.cfg.n_routed_experts,), -1, dtype=torch.int64)
            row_of_expert[held] = torch.arange(len(held))
            dense = [self.compute_weights(layer, e, dtype) for e in held]
            self._stacks[(layer, dtype)] = StackedExperts.build(
                row_of_expert, torch.stack([g for g, _ in dense]), torch.stack([d for _, d in dense])
            )
            for e in held:  # the stack is the one dense copy
                self._dense.pop((layer, e, dtype), None)
        return self._stacks[(layer, dtype)]

    @property
    def kernel_reads_e4m3(self) -> bool:
        """Whether the CPU kernel runs on the e4m3 stack: where no dense copies are kept, and beside them where it
        converts e4m3 in hardware (reading a quarter of the bytes then beats reading fp32: BENCHMARKS.md)."""
        return self.device.type == "cpu" and (not self.cache_dense or cpu_routed.fast_e4m3())

    def uses_fp8(self, dtype: torch.dtype | None = None) -> bool:
        """Whether compute in `dtype` runs as FP8 grouped GEMMs (reduced precision with `fp8_compute`)."""
        return self.fp8_compute and (dtype or self.dtype) != torch.float32

    def prepare(self, layer: int, dtype: torch.dtype | None = None) -> None:
        """Build the layer's compute forms for `dtype` now rather than on the first batch: the e4m3 stack where
        FP8 GEMMs or the CPU kernel read it, the dense stack where one is kept."""
        if self.uses_fp8(dtype) or self.kernel_reads_e4m3:
            self.fp8_stacked(layer)
        if not self.uses_fp8(dtype):
            self.stacked(layer, dtype)

    def fp8_stacked(self, layer: int) -> Fp8Experts | None:
        """The layer's held experts as one e4m3 stack (None when it holds none); each expert's weights become views
        of its row, so the FP8 bytes are held once."""
        if layer not in self._fp8_stacks:
            held = [e for (l, e) in sorted(self._fp8) if l == layer]
            if not held:
                return None
            row_of_expert = torch.full((self.cfg.n_routed_experts,), -1, dtype=torch.int64)
            row_of_expert[held] = torch.arange(len(held))
            experts = [self._fp8[(layer, e)] for e in held]
            pieces = []
            for name in ("gate", "up", "down"):
                linears = [getattr(w, name) for w in experts]
                weight = torch.stack([lw.weight for lw in linears])
                scale = torch.stack([lw.scale_inv for lw in linears])
                for r, lw in enumerate(linears):
                    lw.weight, lw.scale_inv = weight[r], scale[r]
                pieces += [weight, scale]
            self._fp8_stacks[layer] = Fp8Experts(row_of_expert, *pieces)
        return self._fp8_stacks[layer]

    def nbytes(self) -> int:
        """Bytes of weights held: the FP8 ones and any dense copies."""
        dense = [t for pair in self._dense.values() for t in pair]
        dense += [t for s in self._stacks.values() for t in (s.gate_up, s.down)]
        return sum(w.nbytes() for w in self._fp8.values()) + sum(t.numel() * t.element_size() for t in dense)


class LayerWeights:
    """One layer's view of a store in one compute dtype, as grouped compute asks for weights."""

    def __init__(self, store: ExpertStore, layer: int, dtype: torch.dtype | None = None):
        self.store, self.layer, self.dtype = store, layer, dtype or store.dtype

    def expert(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.compute_weights(self.layer, expert, self.dtype)

    def stacked(self) -> StackedExperts | None:
        return None if self.store.uses_fp8(self.dtype) else self.store.stacked(self.layer, self.dtype)

    def fp8(self) -> Fp8Experts | None:
        return self.store.fp8_stacked(self.layer) if self.store.uses_fp8(self.dtype) else None

    def fp8_kernel(self) -> Fp8Experts | None:
        """The e4m3 stack, where the CPU kernel runs on it (ExpertStore.kernel_reads_e4m3)."""
        return self.store.fp8_stacked(self.layer) if self.store.kernel_reads_e4m3 else None
