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
    normal = y_ref.float().abs() >= 2 ** -6  # outside e4m3's subnormal range codes must agree exactly
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
