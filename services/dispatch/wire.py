"""Tensors on the wire (expertmesh.v1.Tensor): raw bytes plus shape and element type, and the dispatch formats.

Dispatch dtypes (`--dispatch-dtype`): fp8 sends e4m3 plus one fp32 scale per token per 128 channels and gets
BF16 partial sums back (as DeepSeek does in production); bf16 sends and returns BF16; fp32 is exact.
"""

from __future__ import annotations

import torch

import kernels
from expertmesh.v1 import tensor_pb2
from services.errors import InvalidRequestError

ELEMENT_TYPES = {
    torch.float32: tensor_pb2.ELEMENT_TYPE_FLOAT32,
    torch.bfloat16: tensor_pb2.ELEMENT_TYPE_BFLOAT16,
    torch.float8_e4m3fn: tensor_pb2.ELEMENT_TYPE_FLOAT8_E4M3,
}
TORCH_DTYPES = {v: k for k, v in ELEMENT_TYPES.items()}
DISPATCH_DTYPES = ("fp8", "bf16", "fp32")


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    t = t.detach().contiguous().cpu()
    return tensor_pb2.Tensor(dtype=ELEMENT_TYPES[t.dtype], shape=list(t.shape),
                             data=t.view(torch.uint8).numpy().tobytes())


def decode(msg: tensor_pb2.Tensor, field: str) -> torch.Tensor:
    """Tensor message -> torch tensor; malformed messages raise InvalidRequestError naming `field`."""
    dtype = TORCH_DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{field}: unsupported element type {msg.dtype}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{field}: negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise InvalidRequestError(f"{field}: {len(msg.data)} bytes do not hold shape {list(shape)} of {itemsize}-byte elements")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)


class DispatchRows:
    """[T, H] activations put in the dispatch format once; any subset of rows is then encoded by indexing."""

    def __init__(self, x: torch.Tensor, dispatch: str):
        if dispatch == "fp8":
            self.values, self.scales = kernels.act_quant(x)  # [T, H] e4m3, [T, ceil(H/128)] fp32
        elif dispatch in ("bf16", "fp32"):
            self.values, self.scales = x.to(torch.bfloat16 if dispatch == "bf16" else torch.float32), None
        else:
            raise ValueError(f"unknown dispatch dtype {dispatch!r} (choose from {', '.join(DISPATCH_DTYPES)})")

    def encode(self, rows: torch.Tensor) -> tuple[tensor_pb2.Tensor, tensor_pb2.Tensor | None]:
        """-> (hidden, scale or None) of `rows` [N]."""
        return encode(self.values[rows]), None if self.scales is None else encode(self.scales[rows])


def decode_hidden(hidden: tensor_pb2.Tensor, scale: tensor_pb2.Tensor | None, hidden_size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The pool's side: -> [N, H] in the compute `dtype`, checking shapes against the model."""
    x = decode(hidden, "hidden")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise InvalidRequestError(f"hidden: expected shape [N, {hidden_size}], got {list(x.shape)}")
    if x.dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    if scale is None or not scale.data:
        raise InvalidRequestError("hidden_scale: required with float8 hidden states")
    s = decode(scale, "hidden_scale")
    expect = (x.shape[0], -(-hidden_size // 128))
    if tuple(s.shape) != expect or s.dtype != torch.float32:
        raise InvalidRequestError(f"hidden_scale: expected float32 shape {list(expect)}, got {s.dtype} {list(s.shape)}")
    return kernels.act_dequant(x, s, dtype)


def response_dtype(dispatch: str) -> int:
    return tensor_pb2.ELEMENT_TYPE_FLOAT32 if dispatch == "fp32" else tensor_pb2.ELEMENT_TYPE_BFLOAT16
