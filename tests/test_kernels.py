"""Triton FP8 kernels against their plain-torch references (on CPU under TRITON_INTERPRET=1, small shapes).

The interpreter's own fp32->e4m3 cast is broken (Triton 3.9: no carry into the exponent, no saturation); the
kernel rounds to the e4m3 grid itself, so codes are compared exactly except in the fp8 subnormal range.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference

triton_fp8 = pytest.importorskip("kernels.triton_fp8")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows,k", [(5, 256), (3, 320), (1, 128)])
def test_act_quant_matches_reference(rows, k):
    x = torch.randn(rows, k, device=DEVICE) * torch.logspace(-1, 1, k, device=DEVICE)
    y, s = triton_fp8.act_quant(x)
    y_ref, s_ref = reference.act_quant(x.cpu())
    assert s.shape == s_ref.shape == (rows, -(-k // 128))
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    normal = y_ref.float().abs() >= 2**-6  # outside e4m3's subnormal range codes must agree exactly
    assert torch.equal(y.cpu().float()[normal], y_ref.float()[normal])
    rel = (reference.act_dequant(y.cpu(), s.cpu()) - x.cpu()).abs().max() / x.abs().max()
    assert rel < 0.07


def test_act_quant_floor_on_zero_rows():
    y, s = triton_fp8.act_quant(torch.zeros(2, 128, device=DEVICE))
    assert torch.all(s.cpu() == 1e-4 / 448) and torch.all(y.cpu().float() == 0)


@pytest.mark.parametrize("n,k", [(80, 320), (256, 128), (130, 200)])
def test_weight_dequant_exact_with_partial_blocks(n, k):
    q, s = reference.weight_quant(torch.randn(n, k))
    out = triton_fp8.weight_dequant(q.to(DEVICE), s.to(DEVICE))
    assert torch.equal(out.cpu(), reference.weight_dequant(q, s))


@pytest.mark.parametrize("m,n,k", [(4, 80, 256), (33, 130, 320)])
def test_fp8_gemm_matches_reference(m, n, k):
    a, a_s = reference.act_quant(torch.randn(m, k))
    b, b_s = reference.weight_quant(torch.randn(n, k) * 0.05)
    ours = triton_fp8.fp8_gemm(a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), b_s.to(DEVICE)).cpu()
    ref = reference.fp8_gemm(a, a_s, b, b_s)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_reference_gemm_is_the_dequantized_product():
    a, a_s = reference.act_quant(torch.randn(6, 320))
    b, b_s = reference.weight_quant(torch.randn(80, 320))
    expect = reference.act_dequant(a, a_s) @ reference.weight_dequant(b, b_s).T
    torch.testing.assert_close(reference.fp8_gemm(a, a_s, b, b_s), expect, rtol=1e-5, atol=1e-4)


def test_reference_act_quant_saturates_and_round_trips():
    x = torch.tensor([[1000.0, -600.0] + [0.5] * 126])
    y, s = reference.act_quant(x)
    assert s.item() == pytest.approx(1000 / 448)
    assert y.float().abs().max().item() == 448


# ---- grouped FP8 GEMMs (routed experts) ------------------------------------------------------------------------
triton_grouped = pytest.importorskip("kernels.triton_grouped")

# (group counts, stacked row of each group): empty experts, one token, a group over several 64-row tiles
GROUPS = [([0, 1, 70, 0, 5], [1, 0, 2, 1, 0]), ([1], [2]), ([3, 0, 0], [2, 1, 0]), ([17, 33], [0, 0])]


def _stack(r: int, n: int, k: int, scale: float = 0.05, seed: int = 0):
    """r random [n, k] weights quantized to e4m3 blocks -> ([r, n, k] e4m3, [r, ceil(n/128), ceil(k/128)])."""
    g = torch.Generator().manual_seed(seed)
    qs = [reference.weight_quant(torch.randn(n, k, generator=g) * scale) for _ in range(r)]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("counts,rows", GROUPS)
def test_grouped_gemm_matches_reference(counts, rows):
    w, w_s = _stack(3, 96, 200)  # neither dimension a multiple of 128
    a, a_s = reference.act_quant(torch.randn(sum(counts), 200))
    ours = triton_grouped.grouped_fp8_gemm(*_dev(a, a_s, w, w_s), counts, rows).cpu()
    torch.testing.assert_close(ours, reference.grouped_fp8_gemm(a, a_s, w, w_s, counts, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts,rows", GROUPS[:2])
def test_grouped_swiglu_matches_reference(counts, rows):
    gate, gate_s = _stack(3, 96, 320, seed=1)
    up, up_s = _stack(3, 96, 320, seed=2)
    a, a_s = reference.act_quant(torch.randn(sum(counts), 320))
    ours = triton_grouped.grouped_fp8_swiglu(*_dev(a, a_s, gate, gate_s, up, up_s), counts, rows).cpu()
    ref = reference.grouped_fp8_swiglu(a, a_s, gate, gate_s, up, up_s, counts, rows)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts,rows", GROUPS[:2])
def test_grouped_mlp_matches_reference(counts, rows):
    """The whole expert MLP (Triton act_quant too): the down projection's e4m3 input may differ from torch's in
    fp8 subnormals only (see test_act_quant_matches_reference), a tiny difference in the output."""
    h, i = 200, 96
    gate, gate_s = _stack(3, i, h, seed=1)
    up, up_s = _stack(3, i, h, seed=2)
    down, down_s = _stack(3, h, i, seed=3)
    x = torch.randn(sum(counts), h)
    ours = triton_grouped.grouped_fp8_mlp(*_dev(x, gate, gate_s, up, up_s, down, down_s), counts, rows).cpu()
    ref = reference.grouped_fp8_mlp(x, gate, gate_s, up, up_s, down, down_s, counts, rows)
    assert ours.shape == ref.shape == (sum(counts), h)
    assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_grouped_kernels_take_no_rows():
    w, w_s = _stack(2, 96, 200)
    a, a_s = reference.act_quant(torch.randn(0, 200))
    assert triton_grouped.grouped_fp8_gemm(*_dev(a, a_s, w, w_s), [0, 0], [0, 1]).shape == (0, 96)
    x = torch.zeros(0, 200, device=DEVICE)
    assert triton_grouped.grouped_fp8_mlp(
        x, *_dev(*_stack(2, 96, 200), *_stack(2, 96, 200), *_stack(2, 200, 96)), [], []
    ).shape == (0, 200)


def test_grouped_gemm_refuses_counts_that_do_not_fit():
    w, w_s = _stack(2, 96, 200)
    a, a_s = reference.act_quant(torch.randn(4, 200))
    with pytest.raises(ValueError, match="add up"):
        triton_grouped.grouped_fp8_gemm(a, a_s, w, w_s, [1, 2], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        triton_grouped.grouped_fp8_gemm(a, a_s, w, w_s, [4], [2])
    with pytest.raises(TypeError, match="e4m3"):
        triton_grouped.grouped_fp8_gemm(a.float(), a_s, w, w_s, [4], [0])


def test_tile_schedule_covers_each_group_in_block_rows():
    tile_row, start, end = triton_grouped.tile_schedule([0, 1, 70, 0, 5], [1, 0, 2, 1, 0], 64, torch.device("cpu"))
    assert tile_row.tolist() == [0, 2, 2, 0]
    assert start.tolist() == [0, 1, 65, 71] and end.tolist() == [1, 71, 71, 76]
    assert triton_grouped.block_m_for([1, 3]) == 16 and triton_grouped.block_m_for([40]) == 64


def test_reference_grouped_mlp_is_close_to_the_float_experts():
    """What FP8 activations cost against dequantized weights in float32 (the CPU engine's experts)."""
    h, i, counts, rows = 200, 96, [5, 0, 9], [1, 0, 2]
    gate, gate_s = _stack(3, i, h, 1.0, 1)
    up, up_s = _stack(3, i, h, 1.0, 2)
    down, down_s = _stack(3, h, i, 1.0, 3)
    x = torch.randn(sum(counts), h)
    ours = reference.grouped_fp8_mlp(x, gate, gate_s, up, up_s, down, down_s, counts, rows)
    dq = lambda q, s, r: reference.weight_dequant(q[r], s[r])  # noqa: E731
    expect = torch.zeros_like(ours)
    for row, lo, hi in reference._groups(counts, rows):
        g, u = x[lo:hi] @ dq(gate, gate_s, row).T, x[lo:hi] @ dq(up, up_s, row).T
        expect[lo:hi] = (torch.nn.functional.silu(g) * u) @ dq(down, down_s, row).T
    assert (ours - expect).norm() / expect.norm() < 0.06
