"""Pre-packed (oneDNN) linear weights: same products as F.linear, used only where they pay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.math.packed_linear import PACK_MIN_ELEMENTS, Linear, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 32, 200])
def test_packed_float32_matches_float64_like_plain_gemm(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1024, 320, generator=g)  # 320: not a multiple of the 128-wide blocks
    x = torch.randn(rows, 320, generator=g)
    lin = Linear(w)
    assert lin.packed is not None
    exact = x.double() @ w.double().t()
    ours, plain = lin(x), F.linear(x, w)
    assert ours.dtype == torch.float32 and ours.shape == (rows, 1024)
    # float32 accumulation: within a few ulps of the float64 product, like MKL's
    assert (ours.double() - exact).abs().max() <= 4 * (plain.double() - exact).abs().max() + 1e-5
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-4)


def test_packed_bfloat16_and_three_dimensional_inputs():
    """bfloat16 weights are packed where the CPU can (AVX-512 BW/VL/DQ or AVX-NE-CONVERT) and stay plain where it
    cannot (AVX2 only: oneDNN refuses them there), with the same results either way."""
    w = torch.randn(768, 512).bfloat16()
    x = torch.randn(2, 5, 512).bfloat16()
    lin = Linear(w)
    assert (lin.packed is not None) == packing_available(torch.bfloat16)
    torch.testing.assert_close(lin(x), F.linear(x, w), rtol=2e-2, atol=2e-2)


def test_small_weights_and_other_dtypes_stay_plain():
    small = Linear(torch.randn(64, 64))
    assert small.packed is None and PACK_MIN_ELEMENTS > 64 * 64
    x = torch.randn(4, 64)
    torch.testing.assert_close(small(x), F.linear(x, small.weight))


def test_packed_only_linear_names_a_wrong_input_dtype():
    lin = Linear(torch.randn(1024, 512), pack=True, keep_plain=False)
    assert lin.weight is None and lin.shape == (1024, 512)
    with pytest.raises(TypeError, match=r"packed torch.float32 linear \[1024, 512\] called with a torch.bfloat16"):
        lin(torch.randn(2, 512).bfloat16())
