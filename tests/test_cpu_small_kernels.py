"""The CPU routing, argmax and RMSNorm kernels (kernels/cpu_router.py, cpu_argmax.py, cpu_norm.py) against their
torch forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import cpu_argmax, cpu_router
from kernels.cpu_build import library
from services.format.presets import preset_config
from services.gateway.router import Router

pytestmark = pytest.mark.skipif(library() is None, reason="the CPU kernels are not built here")


def _router(**overrides) -> Router:
    cfg = dataclasses.replace(preset_config("small"), **overrides)
    g = torch.Generator().manual_seed(cfg.n_routed_experts + cfg.n_group)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=g) * 0.05
    bias = torch.randn(cfg.n_routed_experts, generator=g) * 0.1
    return Router(cfg, weight, bias)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # small: 64 experts, 8 groups, 4 kept, top-6
        dict(n_routed_experts=256, num_experts_per_tok=8),  # DeepSeek-V3's shape: 256 experts, 8 groups, top-8
        dict(n_group=1, topk_group=1),  # no groups
        dict(norm_topk_prob=False, routed_scaling_factor=1.0),
        dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),  # tiny's
    ],
)
def test_the_kernel_chooses_what_torch_chooses(overrides):
    router = _router(**overrides)
    cfg = router.cfg
    x = torch.randn(300, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    idx, w = router(x)  # the kernel
    scores = (x @ router.weight.T).sigmoid()
    ref_idx, ref_w = router.choose(scores)
    assert idx.dtype == torch.int64 and idx.shape == (300, cfg.num_experts_per_tok)
    assert torch.equal(idx, ref_idx)  # the same experts, best first
    # the weights' sum may be added in another order than torch's reduction: equal to a few ulps
    torch.testing.assert_close(w, ref_w, rtol=5e-7, atol=0)
    if cfg.n_group > 1:  # every choice lies in a kept group
        per = cfg.n_routed_experts // cfg.n_group
        assert all(len(set((row // per).tolist())) <= cfg.topk_group for row in idx)


def test_ties_go_to_the_lower_index_and_nans_stay_in_range():
    router = _router()
    cfg = router.cfg
    flat = torch.full((2, cfg.n_routed_experts), 0.5)  # every score equal (bias aside)
    router.bias = torch.zeros(cfg.n_routed_experts)
    idx, w = cpu_router.route(flat, router.bias, cfg.n_group, cfg.topk_group, 6, True, 2.5)
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5] and torch.allclose(w, torch.full_like(w, 2.5 / 6))
    flat[1, 9] = float("nan")
    idx, _ = cpu_router.route(flat, router.bias, cfg.n_group, cfg.topk_group, 6, True, 2.5)
    assert idx[1, 0] == 9 and len(set(idx[1].tolist())) == 6 and bool(((idx >= 0) & (idx < 64)).all())


def test_sizes_the_kernel_does_not_take_fall_back_to_torch():
    scores = torch.rand(3, 12)
    assert cpu_router.route(scores, torch.zeros(12), 5, 2, 2, True, 1.0) is None  # 12 experts in 5 groups
    assert cpu_router.route(scores, torch.zeros(12), 4, 1, 4, True, 1.0) is None  # 4 choices from 3 open experts
    assert cpu_router.route(scores.double(), torch.zeros(12), 1, 1, 2, True, 1.0) is None


def test_argmax_rows_is_torchs_argmax():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 16384 + 5, generator=g)  # a tail past the vectors
    x[1, 7] = x[1, 9000] = 1e9  # a tie: the first
    x[2] = float("-inf")  # every value -inf: index 0
    x[3, 12] = x[3, 40] = float("nan")  # NaN wins, the first one
    x[4, -1] = 1e9  # the maximum in the tail
    assert torch.equal(cpu_argmax.argmax_rows(x), x.argmax(-1))
    view = x[:, 100:200]  # rows of a wider tensor
    assert torch.equal(cpu_argmax.argmax_rows(view), view.argmax(-1))
    assert cpu_argmax.argmax_rows(torch.empty(0, 16)).shape == (0,)


def test_rms_norm_kernel_is_torchs_to_a_few_ulps():
    from kernels import cpu_norm

    g = torch.Generator().manual_seed(4)
    for rows, n in ((1, 512), (32, 192), (7, 100), (300, 7168)):  # tails past the vectors; DeepSeek-V3's width
        x, w = torch.randn(rows, n, generator=g) * 3, torch.randn(n, generator=g)
        out = cpu_norm.rms_norm(x, w, 1e-6)
        torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (n,), w, 1e-6), rtol=1e-6, atol=1e-6)
    wide = torch.randn(4, 600, generator=g)
    view = wide[:, :512]  # rows of a wider tensor, as the attention's input projection gives them
    ref = torch.nn.functional.rms_norm(view, (512,), torch.ones(512), 1e-6)
    torch.testing.assert_close(cpu_norm.rms_norm(view, torch.ones(512), 1e-6), ref, rtol=1e-6, atol=1e-6)
    assert cpu_norm.rms_norm(x.double(), w.double(), 1e-6) is None  # not a case it takes: torch's
    assert cpu_norm.rms_norm(x.t(), torch.ones(rows), 1e-6) is None  # columns not contiguous
