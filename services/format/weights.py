"""Typed reading of checkpoint tensors: linear weights (FP8 block-scaled or dense), norms, embeddings, biases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from kernels.reference import BLOCK
from services.errors import CheckpointError
from services.format.checkpoint import CheckpointReader
from services.format.tensor_names import Kind, TensorSpec, stored_name

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class LinearWeight:
    """A [out, in] projection: e4m3 with fp32 block scales [ceil(out/128), ceil(in/128)], or a dense float tensor."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None

    @property
    def is_fp8(self) -> bool:
        return self.scale_inv is not None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scale_inv is None:
            return self.weight.to(dtype)
        return kernels.weight_dequant(self.weight, self.scale_inv, dtype)

    @classmethod
    def quantized(cls, w: torch.Tensor) -> LinearWeight:
        q, s = kernels.weight_quant(w)
        return cls(q, s)

    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (self.scale_inv.numel() * 4 if self.scale_inv is not None else 0)


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def read_linear(reader: CheckpointReader, spec: TensorSpec, quantize_fp8: bool = False) -> LinearWeight:
    """One projection as stored; a dense one is quantized to FP8 blocks when `quantize_fp8`."""
    name = stored_name(spec)
    info = reader.info(name)
    if info.shape != spec.shape:
        raise CheckpointError(name, f"expected shape {list(spec.shape)}, found {list(info.shape)}")
    if info.dtype == torch.float8_e4m3fn:
        weight = reader.get(name)
        scale = reader.get(f"{name}_scale_inv", shape=scale_shape(spec.shape), dtypes=(torch.float32,))
        return LinearWeight(weight, scale)
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(name, f"expected float8_e4m3fn, bfloat16, float16 or float32, found {info.dtype}")
    weight = reader.get(name)
    return LinearWeight.quantized(weight) if quantize_fp8 else LinearWeight(weight)


def read_plain(reader: CheckpointReader, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    """A norm, embedding, router weight or bias, converted to `dtype` (the router bias always fp32)."""
    if spec.kind is Kind.LINEAR:
        raise ValueError(f"{spec.name} is a linear weight: use read_linear")
    tensor = reader.get(stored_name(spec), shape=spec.shape, dtypes=FLOAT_DTYPES)
    return tensor.to(torch.float32 if spec.kind is Kind.BIAS else dtype)
