"""The dispatch codec, both directions: what the gateway encodes is what the pool decodes (exactly, for each
dispatch dtype), and every malformed request is refused with InvalidRequestError naming its field."""

from __future__ import annotations

import pytest
import torch

import kernels
from expertmesh.v1 import expert_pool_pb2, tensor_pb2
from services.dispatch import codec, wire
from services.dispatch.precision import compute_dtype
from services.errors import InvalidRequestError
from services.math.routed_pairs import RoutedPairs

H = 320  # the tiny preset's hidden size: a partial last 128-channel group
E = 16
T, K = 10, 3


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) * torch.logspace(-2, 2, T)[:, None]  # [T, H]
    topk_idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    topk_w = torch.rand(T, K, generator=g)  # [T, K]
    return x, RoutedPairs.from_topk(topk_idx, topk_w)


def _one_pools_share(pairs: RoutedPairs) -> RoutedPairs:
    """The pairs of experts 0-7 (some tokens have none, so rows are a proper subset)."""
    keep = pairs.expert < 8
    return RoutedPairs(pairs.token[keep], pairs.expert[keep], pairs.weight[keep])


def _over_the_wire(request: expert_pool_pb2.ForwardRequest) -> expert_pool_pb2.ForwardRequest:
    return expert_pool_pb2.ForwardRequest.FromString(request.SerializeToString())


def _decode(request) -> codec.PoolBatch:
    return codec.decode_request(_over_the_wire(request), H, E)


@pytest.mark.parametrize("dispatch", ["fp8", "bf16", "fp32"])
def test_request_round_trip_per_dispatch_dtype(dispatch):
    x, pairs = _batch()
    share = _one_pools_share(pairs)
    tokens, request = codec.encode_request(3, codec.DispatchRows(x, dispatch), share, placement_version=7)
    assert tokens.tolist() == sorted(set(share.token.tolist()))  # each token once
    batch = _decode(request)
    assert (batch.layer, request.placement_version) == (3, 7)
    # the pairs name rows of the request's own hidden, and come back exactly
    assert torch.equal(tokens[batch.pairs.token], share.token)
    assert torch.equal(batch.pairs.expert, share.expert)
    assert torch.equal(batch.pairs.weight, share.weight)
    wire_dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}[dispatch]
    dtype = compute_dtype(wire_dtype)
    assert batch.hidden.dtype == dtype
    if dispatch == "fp8":  # exactly e4m3 of the pool's own tokens, as if it had quantized them itself
        q, s = kernels.act_quant(x[tokens])
        assert torch.equal(wire.decode(request.hidden, "hidden").view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(batch.hidden, kernels.act_dequant(q, s, dtype))
        assert 0 < float((batch.hidden.float() - x[tokens]).norm() / x[tokens].norm()) < 0.05
    elif dispatch == "bf16":
        assert torch.equal(batch.hidden, x[tokens].to(torch.bfloat16).to(dtype))
    else:
        assert torch.equal(batch.hidden, x[tokens])  # fp32 dispatch is exact
    assert batch.reply_dtype == (torch.float32 if dispatch == "fp32" else torch.bfloat16)


@pytest.mark.parametrize("reply_dtype", [torch.float32, torch.bfloat16])
def test_response_round_trip(reply_dtype):
    partial = torch.randn(4, H)
    response = expert_pool_pb2.ForwardResponse.FromString(
        codec.encode_response(partial, reply_dtype).SerializeToString()
    )
    assert response.partial.dtype == wire.ELEMENT_TYPES[reply_dtype]
    got = codec.decode_partial(response, 4, H)
    assert got.dtype == torch.float32
    assert torch.equal(got, partial.to(reply_dtype).float())


def test_malformed_answer_is_named():
    response = codec.encode_response(torch.randn(4, H), torch.float32)
    with pytest.raises(InvalidRequestError, match=r"^partial: expected FLOAT32 or BFLOAT16 \[5, 320\]"):
        codec.decode_partial(response, 5, H)
    with pytest.raises(InvalidRequestError, match="^partial: expected"):
        codec.decode_partial(
            expert_pool_pb2.ForwardResponse(partial=wire.encode(torch.zeros(4, H, dtype=torch.int32))), 4, H
        )


def test_unknown_dispatch_dtype_is_named():
    with pytest.raises(ValueError, match="'fp4'"):
        codec.DispatchRows(torch.randn(2, H), "fp4")


def _good(dispatch: str = "fp32") -> expert_pool_pb2.ForwardRequest:
    """2 rows; pairs (0, 1) and (1, 5), weights 0.5."""
    x = torch.randn(2, H)
    pairs = RoutedPairs(torch.tensor([0, 1]), torch.tensor([1, 5]), torch.tensor([0.5, 0.5]))
    return codec.encode_request(1, codec.DispatchRows(x, dispatch), pairs)[1]


def _with(request, **fields) -> expert_pool_pb2.ForwardRequest:
    out = expert_pool_pb2.ForwardRequest()
    out.CopyFrom(request)
    for name, value in fields.items():
        if value is None:
            out.ClearField(name)
        elif isinstance(value, tensor_pb2.Tensor):
            getattr(out, name).CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


def _i32(rows) -> tensor_pb2.Tensor:
    return wire.encode(torch.tensor(rows, dtype=torch.int32))


MALFORMED = {
    "hidden of a non-dispatch element type": (dict(hidden=_i32([[1] * H] * 2)), "^hidden: element type INT32"),
    "hidden of the wrong width": (dict(hidden=wire.encode(torch.randn(2, 100))), r"^hidden: expected shape \[N, 320\]"),
    "hidden of one dimension": (dict(hidden=wire.encode(torch.randn(H))), r"^hidden: expected shape"),
    "hidden short of bytes": (
        dict(hidden=tensor_pb2.Tensor(dtype=1, shape=[2, H], data=b"xx")),
        "^hidden: 2 bytes do not hold",
    ),
    "hidden holding NaN": (dict(hidden=wire.encode(torch.full((2, H), float("nan")))), "^hidden: holds a non-finite"),
    "a scale beside float32 hidden": (dict(hidden_scale=wire.encode(torch.ones(2, 3))), "^hidden_scale: only with"),
    "pairs as float32": (dict(pairs=wire.encode(torch.tensor([[0.0, 1.0], [1.0, 5.0]]))), "^pairs: expected INT32"),
    "pairs of three columns": (dict(pairs=_i32([[0, 1, 0], [1, 5, 0]])), r"^pairs: expected INT32 \[P, 2\]"),
    "token row out of range": (dict(pairs=_i32([[0, 1], [2, 5]])), r"^pairs: token row 2 out of range \[0, 2\)"),
    "negative token row": (dict(pairs=_i32([[-1, 1], [1, 5]])), r"^pairs: token row -1 out of range"),
    "expert out of range": (dict(pairs=_i32([[0, 1], [1, 16]])), r"^pairs: expert 16 out of range \[0, 16\)"),
    "pairs missing": (dict(pairs=None, pair_weights=None), "^pairs: missing, with 2 rows"),
    "no pairs for the rows sent": (
        dict(pairs=wire.encode(torch.empty(0, 2, dtype=torch.int32)), pair_weights=wire.encode(torch.empty(0))),
        "^pairs: none, with 2 rows",
    ),
    "fewer weights than pairs": (
        dict(pair_weights=wire.encode(torch.tensor([0.5]))),
        r"^pair_weights: expected FLOAT32 \[2\] \(one per pair\), got FLOAT32 \[1\]",
    ),
    "weights as bfloat16": (
        dict(pair_weights=wire.encode(torch.tensor([0.5, 0.5], dtype=torch.bfloat16))),
        "^pair_weights: expected FLOAT32",
    ),
    "a NaN weight": (
        dict(pair_weights=wire.encode(torch.tensor([0.5, float("nan")]))),
        "^pair_weights: holds a non-finite",
    ),
    "an infinite weight": (dict(pair_weights=wire.encode(torch.tensor([float("inf"), 0.5]))), "^pair_weights: holds"),
    "answer in float8": (dict(response_dtype=tensor_pb2.ELEMENT_TYPE_FLOAT8_E4M3), "^response_dtype: must be"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_name_the_field(case):
    fields, message = MALFORMED[case]
    codec.decode_request(_good(), H, E)  # the request it was made from is fine
    with pytest.raises(InvalidRequestError, match=message):
        _decode(_with(_good(), **fields))


def test_malformed_fp8_scales_name_the_field():
    good = _good("fp8")
    _decode(good)
    with pytest.raises(InvalidRequestError, match="^hidden_scale: required with FLOAT8_E4M3"):
        _decode(_with(good, hidden_scale=None))
    with pytest.raises(InvalidRequestError, match=r"^hidden_scale: expected FLOAT32 \[2, 3\], got FLOAT32 \[2, 2\]"):
        _decode(_with(good, hidden_scale=wire.encode(torch.ones(2, 2))))
    with pytest.raises(InvalidRequestError, match=r"^hidden_scale: expected FLOAT32 \[2, 3\], got BFLOAT16"):
        _decode(_with(good, hidden_scale=wire.encode(torch.ones(2, 3, dtype=torch.bfloat16))))
    with pytest.raises(InvalidRequestError, match="^hidden: holds a non-finite"):
        _decode(_with(good, hidden_scale=wire.encode(torch.full((2, 3), float("inf")))))


def test_too_many_tokens_are_refused(monkeypatch):
    monkeypatch.setattr(codec, "MAX_TOKENS_PER_CALL", 1)
    with pytest.raises(InvalidRequestError, match="^hidden: 2 tokens in one call exceed the limit of 1"):
        _decode(_good())


def test_an_empty_request_decodes_to_nothing():
    batch = codec.decode_request(expert_pool_pb2.ForwardRequest(layer=1, hidden=wire.encode(torch.empty(0, H))), H, E)
    assert batch.hidden.shape == (0, H) and len(batch.pairs) == 0


def test_the_old_repeated_pair_fields_are_gone():
    fields = expert_pool_pb2.ForwardRequest.DESCRIPTOR.fields_by_name
    assert not {"pair_token", "pair_expert", "pair_weight"} & set(fields)
    assert {f.number for f in fields.values()}.isdisjoint({4, 5, 6})


@pytest.mark.parametrize("dispatch", ["fp8", "bf16", "fp32"])
def test_activations_of_any_layout_encode_as_their_values(dispatch):
    """A strided view of the activations (a column slice of a wider tensor) encodes as its values."""
    wide = torch.randn(T, 2 * H)
    x = wide[:, H:]  # [T, H], row stride 2H
    _, pairs = _batch()
    tokens, request = codec.encode_request(1, codec.DispatchRows(x, dispatch), pairs)
    _, expected = codec.encode_request(1, codec.DispatchRows(x.contiguous(), dispatch), pairs)
    assert request.SerializeToString() == expected.SerializeToString()
