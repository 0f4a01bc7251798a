"""The dispatch codec: what goes to an expert pool and back, both directions, and how the pool checks it.

A `ForwardRequest` carries one MoE layer's share of a batch for one pool:
  hidden        [N, H]  the pool's tokens, each once: e4m3 (fp8 dispatch), bfloat16 or float32
  hidden_scale  [N, ceil(H/128)] float32, with e4m3 only: x = e4m3 * scale per token per 128 channels
  pairs         [P, 2]  int32 (row of hidden, expert)
  pair_weights  [P]     float32 routing weights
and the `ForwardResponse` the partial sums [N, H] (bfloat16 with fp8/bf16 dispatch, float32 with fp32), as
DeepSeek does in production for fp8.

Gateway side: `DispatchRows` quantizes a layer's activations once; `encode_request` encodes any subset of rows
with one pool's pairs; `decode_partial` reads the answer. Pool side: `decode_request` decodes and validates a
request into a `PoolBatch` (every malformed field raises InvalidRequestError naming it); `encode_response`
encodes the partial sums. Which experts the pool holds is the pool's own check, not the codec's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from expertmesh.v1 import expert_pool_pb2, tensor_pb2
from services.dispatch import DISPATCH_DTYPES, wire
from services.dispatch.precision import compute_dtype
from services.errors import InvalidRequestError
from services.math.routed_pairs import RoutedPairs

MAX_TOKENS_PER_CALL = 65536  # rows of hidden a pool accepts in one call
SCALE_BLOCK = 128  # channels per fp8 activation scale
REPLY_DTYPES = {
    tensor_pb2.ELEMENT_TYPE_FLOAT32: torch.float32,
    tensor_pb2.ELEMENT_TYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.ELEMENT_TYPE_UNSPECIFIED: torch.bfloat16,
}
HIDDEN_DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float32)


# ---- gateway side ---------------------------------------------------------------------------------------------
class DispatchRows:
    """A layer's activations [T, H] in the dispatch format, quantized once. fp8 scales are per token, so the
    encoding of any subset of rows equals quantizing that subset alone: each pool gets exactly e4m3 of its own
    tokens."""

    def __init__(self, x: torch.Tensor, dispatch: str):
        if dispatch == "fp8":
            self.values, self.scales = kernels.act_quant(x)  # [T, H] e4m3, [T, ceil(H/128)] fp32
        elif dispatch in ("bf16", "fp32"):
            self.values, self.scales = x.to(torch.bfloat16 if dispatch == "bf16" else torch.float32), None
        else:
            raise ValueError(f"unknown dispatch dtype {dispatch!r} (choose from {', '.join(DISPATCH_DTYPES)})")
        self.dispatch = dispatch

    def fill(self, rows: torch.Tensor, request: expert_pool_pb2.ForwardRequest) -> None:
        """rows [N] -> the request's hidden (and hidden_scale with e4m3)."""
        wire.fill(request.hidden, self.values[rows])
        if self.scales is not None:
            wire.fill(request.hidden_scale, self.scales[rows])


def reply_element_type(dispatch: str) -> int:
    """The element type a pool answers in: float32 for fp32 dispatch, else bfloat16."""
    return tensor_pb2.ELEMENT_TYPE_FLOAT32 if dispatch == "fp32" else tensor_pb2.ELEMENT_TYPE_BFLOAT16


def encode_request(
    layer: int,
    rows: DispatchRows,
    pairs: RoutedPairs,
    placement_version: int = 0,
    into: expert_pool_pb2.ForwardRequest | None = None,
) -> tuple[torch.Tensor, expert_pool_pb2.ForwardRequest]:
    """One pool's request: `pairs` name rows of `rows` (the whole batch), written into `into` (a stream message's
    field: no copy) or a new message. -> (tokens [N]: the batch rows sent, ascending, each once; the request,
    whose pairs name rows of its own hidden)."""
    tokens = torch.unique(pairs.token)  # [N]
    local = torch.searchsorted(tokens, pairs.token)  # [P] row of the request's hidden
    packed = torch.stack((local, pairs.expert), dim=1).to(torch.int32)  # [P, 2]
    request = into if into is not None else expert_pool_pb2.ForwardRequest()
    request.layer = layer
    rows.fill(tokens, request)
    wire.fill(request.pairs, packed)
    wire.fill(request.pair_weights, pairs.weight.to(torch.float32))
    request.response_dtype = reply_element_type(rows.dispatch)
    request.placement_version = placement_version
    return tokens, request


def decode_partial(
    response: expert_pool_pb2.ForwardResponse, rows: int, hidden_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A pool's answer -> partial sums [rows, H] in `dtype`; a malformed one raises InvalidRequestError."""
    partial = wire.decode(response.partial, "partial")
    if partial.dtype not in (torch.float32, torch.bfloat16) or tuple(partial.shape) != (rows, hidden_size):
        raise InvalidRequestError(
            f"partial: expected FLOAT32 or BFLOAT16 [{rows}, {hidden_size}], "
            f"got {wire.element_type_name(response.partial.dtype)} {list(partial.shape)}"
        )
    return partial.to(dtype)


# ---- pool side ------------------------------------------------------------------------------------------------
@dataclass
class PoolBatch:
    """A decoded, validated ForwardRequest."""

    layer: int
    hidden: torch.Tensor  # [N, H] in the compute dtype
    pairs: RoutedPairs  # token: row of hidden
    reply_dtype: torch.dtype  # of the partial sums to answer with


def decode_request(
    request: expert_pool_pb2.ForwardRequest, hidden_size: int, n_experts: int, device_type: str = "cpu"
) -> PoolBatch:
    """Decode and check a request against the model (hidden size, expert count). The hidden states come in the
    compute dtype of their dispatch format on this hardware (services.dispatch.precision)."""
    reply_dtype = REPLY_DTYPES.get(request.response_dtype)
    if reply_dtype is None:
        raise InvalidRequestError(
            f"response_dtype: must be FLOAT32 or BFLOAT16, got {wire.element_type_name(request.response_dtype)}"
        )
    hidden = _decode_hidden(request, hidden_size, device_type)
    pairs = _decode_pairs(request, hidden.shape[0], n_experts)
    return PoolBatch(request.layer, hidden, pairs, reply_dtype)


def encode_response(
    partial: torch.Tensor, reply_dtype: torch.dtype, into: expert_pool_pb2.ForwardResponse | None = None
) -> expert_pool_pb2.ForwardResponse:
    """partial [N, H] -> the answer in `reply_dtype` (converted only when it is computed in another), written into
    `into` (a stream message's field) or a new message."""
    response = into if into is not None else expert_pool_pb2.ForwardResponse()
    wire.fill(response.partial, partial.to(reply_dtype))
    return response


def _decode_hidden(request: expert_pool_pb2.ForwardRequest, hidden_size: int, device_type: str) -> torch.Tensor:
    x = wire.decode(request.hidden, "hidden")
    if x.dtype not in HIDDEN_DTYPES:
        raise InvalidRequestError(
            f"hidden: element type {wire.element_type_name(request.hidden.dtype)} is not a "
            f"dispatch format (FLOAT8_E4M3, BFLOAT16 or FLOAT32)"
        )
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise InvalidRequestError(f"hidden: expected shape [N, {hidden_size}], got {list(x.shape)}")
    if x.shape[0] > MAX_TOKENS_PER_CALL:
        raise InvalidRequestError(f"hidden: {x.shape[0]} tokens in one call exceed the limit of {MAX_TOKENS_PER_CALL}")
    dtype = compute_dtype(x.dtype, device_type)
    has_scale = request.HasField("hidden_scale")
    if x.dtype != torch.float8_e4m3fn:
        if has_scale:
            raise InvalidRequestError("hidden_scale: only with FLOAT8_E4M3 hidden states")
        x = x.to(dtype)
    else:
        if not has_scale:
            raise InvalidRequestError("hidden_scale: required with FLOAT8_E4M3 hidden states")
        s = wire.decode(request.hidden_scale, "hidden_scale")
        expect = (x.shape[0], -(-hidden_size // SCALE_BLOCK))
        if tuple(s.shape) != expect or s.dtype != torch.float32:
            raise InvalidRequestError(
                f"hidden_scale: expected FLOAT32 {list(expect)}, got "
                f"{wire.element_type_name(request.hidden_scale.dtype)} {list(s.shape)}"
            )
        x = kernels.act_dequant(x, s, dtype)
    if not bool(torch.isfinite(x).all()):
        raise InvalidRequestError("hidden: holds a non-finite value")
    return x


def _decode_pairs(request: expert_pool_pb2.ForwardRequest, n_rows: int, n_experts: int) -> RoutedPairs:
    if not request.HasField("pairs"):
        if n_rows or request.HasField("pair_weights"):
            raise InvalidRequestError(f"pairs: missing, with {n_rows} rows of hidden")
        return RoutedPairs.empty()
    packed = wire.decode(request.pairs, "pairs")  # [P, 2]
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != 2:
        raise InvalidRequestError(
            f"pairs: expected INT32 [P, 2], got {wire.element_type_name(request.pairs.dtype)} {list(packed.shape)}"
        )
    weight = wire.decode(request.pair_weights, "pair_weights")  # [P]
    if weight.dtype != torch.float32 or tuple(weight.shape) != (packed.shape[0],):
        raise InvalidRequestError(
            f"pair_weights: expected FLOAT32 [{packed.shape[0]}] (one per pair), got "
            f"{wire.element_type_name(request.pair_weights.dtype)} {list(weight.shape)}"
        )
    if packed.shape[0] == 0:
        if n_rows:
            raise InvalidRequestError(f"pairs: none, with {n_rows} rows of hidden")
        return RoutedPairs.empty()
    _check_ranges(packed, n_rows, n_experts)
    if not bool(torch.isfinite(weight).all()):
        raise InvalidRequestError("pair_weights: holds a non-finite value")
    token, expert = packed.t().to(torch.int64, memory_format=torch.contiguous_format)  # [P] each
    return RoutedPairs(token, expert, weight)


def _check_ranges(packed: torch.Tensor, n_rows: int, n_experts: int) -> None:
    """packed [P, 2] (row, expert), P > 0: rows in [0, n_rows), experts in [0, n_experts)."""
    lows, highs = (v.tolist() for v in packed.aminmax(dim=0))  # one pass over both columns
    for what, low, high, bound in (("token row", lows[0], highs[0], n_rows), ("expert", lows[1], highs[1], n_experts)):
        if low < 0 or high >= bound:
            raise InvalidRequestError(f"pairs: {what} {low if low < 0 else high} out of range [0, {bound})")
