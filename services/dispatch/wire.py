"""Tensors on the wire (expertmesh.v1.Tensor): raw little-endian bytes plus shape and element type.

Generic in both directions; what a pool call carries, and how it is checked, is `services.dispatch.codec`.
"""

from __future__ import annotations

import torch

from expertmesh.v1 import tensor_pb2
from services.errors import InvalidRequestError

ELEMENT_TYPES = {
    torch.float32: tensor_pb2.ELEMENT_TYPE_FLOAT32,
    torch.bfloat16: tensor_pb2.ELEMENT_TYPE_BFLOAT16,
    torch.float8_e4m3fn: tensor_pb2.ELEMENT_TYPE_FLOAT8_E4M3,
    torch.int32: tensor_pb2.ELEMENT_TYPE_INT32,
}
TORCH_DTYPES = {v: k for k, v in ELEMENT_TYPES.items()}


def element_type_name(element_type: int) -> str:
    """ELEMENT_TYPE_FLOAT32 -> "FLOAT32" (for messages); unknown numbers as themselves."""
    try:
        return tensor_pb2.ElementType.Name(element_type).removeprefix("ELEMENT_TYPE_")
    except ValueError:
        return str(element_type)


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    return fill(tensor_pb2.Tensor(), t)


def fill(msg: tensor_pb2.Tensor, t: torch.Tensor) -> tensor_pb2.Tensor:
    """Write `t` into `msg`, a field of a message being built (one copy of the bytes, none when it is nested)."""
    t = t.detach().contiguous().cpu()
    msg.dtype = ELEMENT_TYPES[t.dtype]
    msg.shape[:] = list(t.shape)
    msg.data = t.view(torch.uint8).numpy().tobytes()
    return msg


def fill_array(msg: tensor_pb2.Tensor, element_type: int, shape, array) -> tensor_pb2.Tensor:
    """Write a host array's bytes into `msg` as `element_type` of `shape` (the caller's promise that they fit)."""
    msg.dtype = element_type
    msg.shape[:] = shape
    msg.data = array.tobytes()
    return msg


def decode(msg: tensor_pb2.Tensor, field: str) -> torch.Tensor:
    """Tensor message -> torch tensor; malformed messages raise InvalidRequestError naming `field`."""
    dtype = TORCH_DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{field}: unsupported element type {element_type_name(msg.dtype)}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{field}: negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = dtype.itemsize
    if len(msg.data) != numel * itemsize:
        raise InvalidRequestError(
            f"{field}: {len(msg.data)} bytes do not hold shape {list(shape)} of {itemsize}-byte elements"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).view(shape)  # a writable copy of the bytes
