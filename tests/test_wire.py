"""Tensors on the wire: the dispatch formats, encoded once per layer and sliced per pool."""

from __future__ import annotations

import pytest
import torch

import kernels
from services.dispatch import wire
from services.errors import InvalidRequestError

H = 320  # the tiny preset's hidden size: a partial last 128-channel group


def test_fp8_rows_encoded_once_equal_each_pool_quantizing_its_own():
    """Scales are per token, so quantizing a layer's activations once and sending any subset of rows is the same
    as quantizing that subset: what each pool decodes is exactly e4m3 of its own tokens."""
    x = torch.randn(10, H) * torch.logspace(-2, 2, 10)[:, None]
    rows = torch.tensor([1, 4, 5, 9])
    hidden, scale = wire.DispatchRows(x, "fp8").encode(rows)
    got = wire.decode_hidden(hidden, scale, H)
    q, s = kernels.act_quant(x[rows])
    assert torch.equal(got, kernels.act_dequant(q, s, torch.float32))
    assert wire.decode(hidden, "hidden").dtype == torch.float8_e4m3fn
    rel = (got - x[rows]).norm() / x[rows].norm()
    assert 0 < rel < 0.05  # e4m3: ~2.6% relative error, never exact on random data


@pytest.mark.parametrize("dispatch,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_and_fp32_rows_round_trip(dispatch, dtype):
    x = torch.randn(6, H)
    rows = torch.tensor([0, 2, 3])
    hidden, scale = wire.DispatchRows(x, dispatch).encode(rows)
    assert scale is None
    assert torch.equal(wire.decode_hidden(hidden, None, H), x[rows].to(dtype).float())


def test_unknown_dispatch_dtype_is_named():
    with pytest.raises(ValueError, match="'fp4'"):
        wire.DispatchRows(torch.randn(2, H), "fp4")


def test_malformed_hidden_names_the_field():
    x = torch.randn(3, H)
    hidden, scale = wire.DispatchRows(x, "fp8").encode(torch.arange(3))
    with pytest.raises(InvalidRequestError, match="hidden: expected shape"):
        wire.decode_hidden(hidden, scale, 512)
    with pytest.raises(InvalidRequestError, match="hidden_scale: required"):
        wire.decode_hidden(hidden, None, H)
    short = type(hidden)(dtype=hidden.dtype, shape=list(hidden.shape), data=hidden.data[:-1])
    with pytest.raises(InvalidRequestError, match="bytes do not hold"):
        wire.decode_hidden(short, scale, H)
