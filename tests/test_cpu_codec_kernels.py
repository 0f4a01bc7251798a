"""The dispatch codec's CPU kernels (kernels/cpu/act_fp8.c, kernels/cpu/routed_pairs.c) against the torch code
they replace: act_quant bit for bit against the reference (every e4m3 value and every rounding tie, random bit
patterns, scales from 1e-8 to 1e30, partial 128-groups), act_dequant and its finiteness check (NaN bytes,
non-finite scales, overflow), weight_dequant bit for bit (every byte, 128x128 blocks, threads, torch's NaN rules
where an output is not finite), the gateway's split of pairs over pools against its torch form, and the pool's
check of the pairs it is sent (each kind of bad pair refused); then a pool request decoded on the fast path
equals the same request decoded by the full checks."""

from __future__ import annotations

import pytest
import torch

from expertmesh.v1 import expert_pool_pb2
from kernels import cpu_act, cpu_pairs, reference
from services.dispatch import codec
from services.math.routed_pairs import RoutedPairs

pytestmark = pytest.mark.skipif(cpu_act.library() is None, reason="no C compiler: no CPU kernel")


def _same_quant(x: torch.Tensor) -> None:
    q, s = cpu_act.act_quant(x)
    q_ref, s_ref = reference.act_quant(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("rows, k", [(1, 512), (32, 512), (7, 200), (3, 1), (5, 7168), (2, 136)])
@pytest.mark.parametrize("magnitude", [1e-8, 1e-5, 1e-3, 1.0, 1e3, 1e30])
def test_act_quant_is_the_reference_bit_for_bit(rows, k, magnitude):
    g = torch.Generator().manual_seed(rows * k)
    _same_quant(torch.randn(rows, k, generator=g) * magnitude)


def test_act_quant_on_every_e4m3_value_and_every_tie():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].unique()  # [253] every finite e4m3 value, ascending
    ties = (values[1:] + values[:-1]) / 2  # exactly between two neighbours: rounds to the even one
    row = torch.cat([values, ties, ties.nextafter(torch.tensor(1e9)), ties.nextafter(torch.tensor(-1e9))])
    row = torch.cat([torch.tensor([448.0]), row])  # the group's amax is 448: the scale is 1, the values stay
    _same_quant(row[None, :])
    _same_quant(row[None, :] * 2.0**-20)  # and the same with a tiny scale


def test_act_quant_on_random_bit_patterns_and_odd_layouts():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (4096, 128), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.where(torch.isfinite(x), x, 0.0) * torch.where(torch.rand(4096, 128, generator=g) < 0.5, -1.0, 1.0)
    _same_quant(x)
    _same_quant(torch.randn(6, 2, 300, generator=g)[:, 1])  # a strided view
    _same_quant(torch.randn(4, 3, 256, generator=g))  # more than 2 dims
    _same_quant(torch.randn(5, 256, generator=g).to(torch.bfloat16))  # bfloat16 activations
    _same_quant(torch.zeros(3, 256))  # the amax floor


def test_act_quant_with_nan_or_infinity_follows_torch():
    x = torch.randn(3, 256)
    x[1, 5], x[2, 200] = float("nan"), float("inf")
    q, s = cpu_act.act_quant(x)
    q_ref, s_ref = reference.act_quant(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.nan_to_num(), s_ref.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k", [(1, 512), (33, 200), (2048, 512)])
def test_act_dequant_is_the_reference_and_finite(dtype, rows, k):
    q, s = reference.act_quant(torch.randn(rows, k) * 3)
    out, finite = cpu_act.act_dequant_finite(q, s, dtype)
    assert finite and torch.equal(out, reference.act_dequant(q, s, dtype))
    got = cpu_act.act_dequant_bytes(q.view(torch.uint8).numpy().tobytes(), s.numpy().tobytes(), rows, k, dtype)
    assert got is not None and got[1] and torch.equal(got[0], out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_dequant_flags_what_is_not_finite(dtype):
    q, s = reference.act_quant(torch.randn(4, 256))
    assert cpu_act.act_dequant_finite(q, s, dtype)[1]
    nan_byte = q.view(torch.uint8).clone()
    nan_byte[2, 7] = 0xFF  # e4m3fn's NaN, negative
    assert not cpu_act.act_dequant_finite(nan_byte.view(torch.float8_e4m3fn), s, dtype)[1]
    for bad_scale in (float("inf"), float("nan"), 3e38):  # 3e38 * 448 overflows
        scales = s.clone()
        scales[3, 1] = bad_scale
        assert not cpu_act.act_dequant_finite(q, scales, dtype)[1], bad_scale
        assert not torch.isfinite(reference.act_dequant(q, scales, dtype)).all()  # as torch says


def _random_pairs(tokens: int, k: int, owners: int, seed: int, shuffled: bool):
    g = torch.Generator().manual_seed(seed)
    token = torch.arange(tokens).repeat_interleave(k)
    if shuffled:  # failover joins several calls' pairs: tokens in no order
        token = token[torch.randperm(token.numel(), generator=g)]
    expert = torch.randint(0, 256, (token.numel(),), generator=g)
    return (
        token,
        expert,
        torch.rand(token.numel(), generator=g),
        torch.randint(0, owners, (token.numel(),), generator=g),
    )


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, threads", [(256, 512, 1), (129, 300, 1), (1, 1, 1), (520, 260, 2), (2048, 1024, 2)])
def test_weight_dequant_is_the_reference_bit_for_bit(dtype, n, k, threads, monkeypatch):
    """Every byte value but NaN, scales over 128x128 blocks (partial ones too, a different scale per block, tiny to
    huge), rows split over threads."""
    monkeypatch.setattr(cpu_act, "WEIGHTS_PER_THREAD", 1 << 10)
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(n * k)
        q = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
        q[(q & 0x7F) == 0x7F] = 0  # no NaN bytes (below)
        q = q.view(torch.float8_e4m3fn)
        scale = 10.0 ** torch.empty(-(-n // 128), -(-k // 128)).uniform_(-30, 30, generator=g)
        assert torch.equal(
            _bits(cpu_act.weight_dequant(q, scale, dtype)), _bits(reference.weight_dequant(q, scale, dtype))
        )
    finally:
        torch.set_num_threads(2)


def test_weight_dequant_gives_torchs_nan_and_inf():
    q = torch.ones(130, 140, dtype=torch.float32).to(torch.float8_e4m3fn)
    scale = torch.ones(2, 2)
    q.view(torch.uint8)[5, 7] = 0xFF  # NaN
    scale[1, 1] = float("inf")
    ours, ref = cpu_act.weight_dequant(q, scale), reference.weight_dequant(q, scale)
    assert torch.equal(ours.isnan(), ref.isnan()) and bool(ours[5, 7].isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())  # inf where the scale is
    with pytest.raises(ValueError, match="scale shape"):
        cpu_act.weight_dequant(q, torch.ones(1, 2))


@pytest.mark.parametrize(
    "tokens, k, owners, shuffled",
    [(1, 6, 2, False), (32, 6, 2, False), (7, 3, 5, True), (300, 8, 72, True), (0, 6, 2, False)],
)
def test_split_pairs_matches_its_torch_form(tokens, k, owners, shuffled):
    token, expert, weight, owner = _random_pairs(tokens, k, owners, tokens + owners, shuffled)
    got = cpu_pairs.split_pairs(token, expert, weight, owner, tokens, owners)
    want = cpu_pairs._split_torch(token, expert, weight, owner, tokens, owners)
    assert (got.pairs_of, got.rows_of) == (want.pairs_of, want.rows_of)
    for name in ("token", "expert", "weight", "packed", "rows"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for o, first, n, row0, r in got.owners():  # each owner's rows, named by its packed pairs, are its tokens
        rows = got.rows[row0 : row0 + r]
        assert torch.equal(rows[got.packed[first : first + n, 0].long()], got.token[first : first + n])
        assert torch.equal(got.token[first : first + n], token[owner == o])
        assert len(set(rows.tolist())) == r


def test_split_pairs_refuses_out_of_range_input():
    one = (torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"token is out of \[0, 3\)"):
        cpu_pairs.split_pairs(torch.tensor([5]), one[0], one[1], torch.tensor([0]), 3, 2)
    with pytest.raises(ValueError, match="owner"):
        cpu_pairs.split_pairs(torch.tensor([0]), one[0], one[1], torch.tensor([2]), 3, 2)


def test_check_pairs_refuses_each_kind_of_bad_pair():
    packed = torch.tensor([[0, 3], [1, 5], [0, 7]], dtype=torch.int32)
    weight = torch.tensor([0.5, 0.25, 0.25])
    held = torch.zeros(64, dtype=torch.bool)
    held[[3, 5, 7]] = True

    def check(packed=packed, weight=weight, rows=2, held=held):
        return cpu_pairs.check_pairs(packed.numpy().tobytes(), weight.numpy().tobytes(), 3, rows, 64, held)

    token, expert, w = check()
    assert token.tolist() == [0, 1, 0] and expert.tolist() == [3, 5, 7] and torch.equal(w, weight)
    assert check(held=None) is not None
    assert check(rows=1) is None  # a row out of range
    assert check(packed=torch.tensor([[0, 3], [-1, 5], [0, 7]], dtype=torch.int32)) is None
    assert check(packed=torch.tensor([[0, 3], [1, 64], [0, 7]], dtype=torch.int32), held=None) is None  # no expert 64
    assert check(held=held & (torch.arange(64) != 7)) is None  # expert 7 not held
    for bad in (float("nan"), float("inf")):
        assert check(weight=torch.tensor([0.5, bad, 0.25])) is None


def test_a_pool_request_decodes_the_same_on_the_fast_path(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 320, generator=g)  # a partial last 128-group
    pairs = RoutedPairs.from_topk(torch.randint(0, 16, (12, 3), generator=g), torch.rand(12, 3, generator=g))
    _, request = codec.encode_request(2, codec.DispatchRows(x, "fp8"), pairs)
    request = expert_pool_pb2.ForwardRequest.FromString(request.SerializeToString())
    held = torch.ones(16, dtype=torch.bool)
    fast = codec.decode_request(request, 320, 16, held=held)
    assert fast.held_checked
    monkeypatch.setattr(codec, "_decode_fast", lambda *a: None)
    full = codec.decode_request(request, 320, 16, held=held)
    assert not full.held_checked
    assert torch.equal(fast.hidden, full.hidden) and fast.reply_dtype == full.reply_dtype
    for name in ("token", "expert", "weight"):
        assert torch.equal(getattr(fast.pairs, name), getattr(full.pairs, name))
    monkeypatch.undo()
    held[int(pairs.expert[0])] = False  # an expert not held: not decided on the fast path, the pool names it
    assert not codec.decode_request(request, 320, 16, held=held).held_checked
