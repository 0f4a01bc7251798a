"""Tensors on the wire: every element type round trips bit for bit; malformed messages name their field."""

from __future__ import annotations

import pytest
import torch

from expertmesh.v1 import tensor_pb2
from services.dispatch import wire
from services.errors import InvalidRequestError


@pytest.mark.parametrize("dtype", sorted(wire.ELEMENT_TYPES, key=str))
def test_every_element_type_round_trips_exactly(dtype):
    x = (torch.randn(3, 5) * 100).to(dtype)
    msg = wire.encode(x.t())  # a non-contiguous view is sent in row-major order
    assert msg.dtype == wire.ELEMENT_TYPES[dtype] and list(msg.shape) == [5, 3]
    got = wire.decode(msg, "x")
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), x.t().contiguous().view(torch.uint8))


def test_empty_tensor_round_trips():
    got = wire.decode(wire.encode(torch.empty(0, 2, dtype=torch.int32)), "pairs")
    assert got.shape == (0, 2) and got.dtype == torch.int32


def test_malformed_tensors_name_the_field():
    with pytest.raises(InvalidRequestError, match="^hidden: unsupported element type UNSPECIFIED"):
        wire.decode(tensor_pb2.Tensor(shape=[1], data=b"\0\0\0\0"), "hidden")
    with pytest.raises(InvalidRequestError, match="^pairs: 3 bytes do not hold shape \\[1\\]"):
        wire.decode(tensor_pb2.Tensor(dtype=tensor_pb2.ELEMENT_TYPE_INT32, shape=[1], data=b"abc"), "pairs")
    with pytest.raises(InvalidRequestError, match="^partial: negative dimension"):
        wire.decode(tensor_pb2.Tensor(dtype=tensor_pb2.ELEMENT_TYPE_FLOAT32, shape=[-1, 2]), "partial")


def test_decoded_tensors_do_not_alias_the_message():
    msg = wire.encode(torch.arange(4, dtype=torch.int32))
    got = wire.decode(msg, "x")
    got += 1  # writable, and the message is untouched
    assert wire.decode(msg, "x").tolist() == [0, 1, 2, 3]
