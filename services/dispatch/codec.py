"""The dispatch codec: what goes to an expert pool and back, both directions, and how the pool checks it.

A `ForwardRequest` carries one MoE layer's share of a batch for one pool:
  hidden        [N, H]  the pool's tokens, each once: e4m3 (fp8 dispatch), bfloat16 or float32
  hidden_scale  [N, ceil(H/128)] float32, with e4m3 only: x = e4m3 * scale per token per 128 channels
  pairs         [P, 2]  int32 (row of hidden, expert)
  pair_weights  [P]     float32 routing weights
and the `ForwardResponse` the partial sums [N, H] (bfloat16 with fp8/bf16 dispatch, float32 with fp32), as
DeepSeek does in production for fp8.

Gateway side: `DispatchRows` quantizes a layer's activations once; `split_for_pools` splits the layer's pairs
over the pools and gathers every pool's rows; `encode_request` writes one pool's share into its request;
`decode_partial` reads the answer. Pool side: `decode_request` decodes and validates a request into a
`PoolBatch` (every malformed field raises InvalidRequestError naming it); `encode_response` encodes the partial
sums. Which experts the pool holds is the pool's own check, not the codec's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from expertmesh.v1 import expert_pool_pb2, tensor_pb2
from kernels import cpu_pairs
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
            values = x.to(torch.bfloat16 if dispatch == "bf16" else torch.float32).contiguous()  # bytes per row
            self.values, self.scales = values, None
        else:
            raise ValueError(f"unknown dispatch dtype {dispatch!r} (choose from {', '.join(DISPATCH_DTYPES)})")
        self.dispatch = dispatch

    def gather(self, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """rows [R] -> (their values' bytes [R, H * itemsize], their scales [R, ceil(H/128)] with e4m3), on the
        host."""
        index = rows.to(self.values.device)
        values = self.values.view(torch.uint8).index_select(0, index).cpu().numpy()
        scales = self.scales.index_select(0, index).cpu().numpy() if self.scales is not None else None
        return values, scales


def reply_element_type(dispatch: str) -> int:
    """The element type a pool answers in: float32 for fp32 dispatch, else bfloat16."""
    return tensor_pb2.ELEMENT_TYPE_FLOAT32 if dispatch == "fp32" else tensor_pb2.ELEMENT_TYPE_BFLOAT16


@dataclass
class PoolShare:
    """The pairs of a layer that go to one pool and the bytes of its request, gathered for every pool at once."""

    owner: int  # the pool's index
    tokens: torch.Tensor  # [N] the batch rows the pool is sent, each once, in order of first appearance
    hidden: np.ndarray  # [N, H * itemsize] uint8: those rows in the dispatch format
    scales: np.ndarray | None  # [N, ceil(H/128)] float32, with e4m3
    packed: np.ndarray  # [P, 2] int32: (row of the request's hidden, expert)
    weights: np.ndarray  # [P] float32
    _split: cpu_pairs.Split | None  # None: no pairs
    _first: int  # the share's first pair in the split

    def pairs(self) -> RoutedPairs:
        """The share's pairs (token: a row of the batch), for failover."""
        if self._split is None:
            return RoutedPairs.empty()
        end = self._first + len(self.weights)
        s = self._split
        return RoutedPairs(s.token[self._first : end], s.expert[self._first : end], s.weight[self._first : end])


def split_for_pools(rows: DispatchRows, pairs: RoutedPairs, owner: torch.Tensor, n_owners: int) -> list[PoolShare]:
    """A layer's pairs (tokens: rows of `rows`) and the pool index [P] each goes to -> one share per pool that has
    pairs, in ascending pool order: the pairs split in one pass (kernels.cpu_pairs), every pool's rows gathered
    at once."""
    split = cpu_pairs.split_pairs(pairs.token, pairs.expert, pairs.weight, owner, rows.values.shape[0], n_owners)
    hidden, scales = rows.gather(split.rows)  # [R, H * itemsize], [R, kb]
    packed, weights = split.packed.numpy(), split.weight.numpy()
    shares = []
    for o, first, n, row0, r in split.owners():
        shares.append(
            PoolShare(
                o,
                split.rows[row0 : row0 + r],
                hidden[row0 : row0 + r],
                scales[row0 : row0 + r] if scales is not None else None,
                packed[first : first + n],
                weights[first : first + n],
                split,
                first,
            )
        )
    return shares


def encode_request(
    layer: int,
    rows: DispatchRows,
    share: PoolShare | RoutedPairs,
    placement_version: int = 0,
    into: expert_pool_pb2.ForwardRequest | None = None,
) -> tuple[torch.Tensor, expert_pool_pb2.ForwardRequest]:
    """One pool's request: its share (or pairs, all for this pool, whose tokens are rows of `rows`), written into
    `into` (a stream message's field: no copy) or a new message. -> (tokens [N]: the batch rows sent, each once;
    the request, whose pairs name rows of its own hidden)."""
    if isinstance(share, RoutedPairs):
        found = split_for_pools(rows, share, torch.zeros_like(share.token), 1)
        share = found[0] if found else _empty_share(rows)
    request = into if into is not None else expert_pool_pb2.ForwardRequest()
    request.layer = layer
    n, h = len(share.tokens), rows.values.shape[1]
    wire.fill_array(request.hidden, wire.ELEMENT_TYPES[rows.values.dtype], (n, h), share.hidden)
    if share.scales is not None:
        wire.fill_array(request.hidden_scale, tensor_pb2.ELEMENT_TYPE_FLOAT32, share.scales.shape, share.scales)
    wire.fill_array(request.pairs, tensor_pb2.ELEMENT_TYPE_INT32, share.packed.shape, share.packed)
    wire.fill_array(request.pair_weights, tensor_pb2.ELEMENT_TYPE_FLOAT32, share.weights.shape, share.weights)
    request.response_dtype = reply_element_type(rows.dispatch)
    request.placement_version = placement_version
    return share.tokens, request


def _empty_share(rows: DispatchRows) -> PoolShare:
    none = torch.empty(0, dtype=torch.int64)
    hidden, scales = rows.gather(none)
    return PoolShare(0, none, hidden, scales, np.empty((0, 2), np.int32), np.empty(0, np.float32), None, 0)


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
    held_checked: bool = False  # whether every expert was found in the `held` mask the decode was given


def decode_request(
    request: expert_pool_pb2.ForwardRequest,
    hidden_size: int,
    n_experts: int,
    device_type: str = "cpu",
    held: torch.Tensor | None = None,
) -> PoolBatch:
    """Decode and check a request against the model (hidden size, expert count). The hidden states come in the
    compute dtype of their dispatch format on this hardware (services.dispatch.precision). `held` [E] bool: the
    experts the pool holds, checked on the fast path (`held_checked`); the pool checks them itself otherwise."""
    fast = _decode_fast(request, hidden_size, n_experts, device_type, held)
    if fast is not None:
        return fast
    reply_dtype = REPLY_DTYPES.get(request.response_dtype)
    if reply_dtype is None:
        raise InvalidRequestError(
            f"response_dtype: must be FLOAT32 or BFLOAT16, got {wire.element_type_name(request.response_dtype)}"
        )
    hidden = _decode_hidden(request, hidden_size, device_type)
    pairs = _decode_pairs(request, hidden.shape[0], n_experts)
    return PoolBatch(request.layer, hidden, pairs, reply_dtype)


def _decode_fast(request, hidden_size: int, n_experts: int, device_type: str, held) -> PoolBatch | None:
    """The common request (e4m3 hidden states with their scales, some pairs) read straight from its bytes in two
    C passes (dequantize and check; check and widen the pairs); None for anything else or anything wrong, which
    the full decode then reads and names."""
    if device_type != "cpu":
        return None
    reply_dtype = REPLY_DTYPES.get(request.response_dtype)
    hidden, scale, pairs, weights = request.hidden, request.hidden_scale, request.pairs, request.pair_weights
    if (
        reply_dtype is None
        or hidden.dtype != tensor_pb2.ELEMENT_TYPE_FLOAT8_E4M3
        or scale.dtype != tensor_pb2.ELEMENT_TYPE_FLOAT32
        or pairs.dtype != tensor_pb2.ELEMENT_TYPE_INT32
        or weights.dtype != tensor_pb2.ELEMENT_TYPE_FLOAT32
        or len(hidden.shape) != 2
        or len(pairs.shape) != 2
    ):
        return None
    n, p, kb = hidden.shape[0], pairs.shape[0], -(-hidden_size // SCALE_BLOCK)
    if (
        not 0 < n <= MAX_TOKENS_PER_CALL
        or p <= 0
        or hidden.shape[1] != hidden_size
        or list(scale.shape) != [n, kb]
        or pairs.shape[1] != 2
        or list(weights.shape) != [p]
    ):
        return None
    data, scale_data, pair_data, weight_data = hidden.data, scale.data, pairs.data, weights.data
    if (
        len(data) != n * hidden_size
        or len(scale_data) != 4 * n * kb
        or len(pair_data) != 8 * p
        or len(weight_data) != 4 * p
    ):
        return None
    decoded = kernels.act_dequant_bytes(data, scale_data, n, hidden_size, compute_dtype(torch.float8_e4m3fn, "cpu"))
    if decoded is None or not decoded[1]:
        return None
    checked = cpu_pairs.check_pairs(pair_data, weight_data, p, n, n_experts, held)
    if checked is None:
        return None
    return PoolBatch(request.layer, decoded[0], RoutedPairs(*checked), reply_dtype, held_checked=held is not None)


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
        finite = bool(torch.isfinite(x).all())
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
        x, finite = kernels.act_dequant_finite(x, s, dtype)  # one pass where the CPU kernel is built
    if not finite:
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
