"""Routed-expert compute: the grouped forms against a plain per-token loop, and partial expert stores."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_routed
from services.errors import ExpertNotHeldError, InvalidRequestError
from services.expert.grouped import grouped_expert_forward
from services.expert.store import ExpertStore, LayerWeights
from services.format.checkpoint import CheckpointReader
from services.math.layers import swiglu
from services.math.packed_linear import packing_available


class _Source(LayerWeights):
    def __init__(self, store, layer, stacked):
        super().__init__(store, layer)
        self.use_stack = stacked

    def stacked(self):
        return super().stacked() if self.use_stack else None

    def fp8_kernel(self):
        return super().fp8_kernel() if self.use_stack else None


@pytest.fixture(scope="module")
def store(tiny_fp8):
    s = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=True)
    for e in range(s.cfg.n_routed_experts):
        s.load(1, e)
    return s


def _reference(store, hidden, idx, w):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(idx.shape[1]):
            gate_up, down = store.compute_weights(1, int(idx[t, k]))
            out[t] += w[t, k] * swiglu(hidden[t : t + 1], gate_up, down)[0]
    return out


PATHS = {
    "_routed_kernel": "the C kernel",
    "_per_expert": "per active expert",
    "_batched": "padded bmm",
    "_all_experts": "all experts, packed",
}


def _choose(path, grouped, store, monkeypatch, dtype=torch.float32):
    """Make grouped compute take `path` for `dtype` weights (or skip where this machine lacks it)."""
    if path == "_all_experts" and not packing_available(dtype):
        pytest.skip(f"no oneDNN packing of {dtype} weights here: no packed path")
    if path == "_routed_kernel":
        if cpu_routed.library() is None:
            pytest.skip("no C compiler: no CPU kernel")
        monkeypatch.setattr(grouped, "KERNEL_MAX_ROWS_PER_EXPERT", 1 << 30)
        monkeypatch.setattr(grouped, "KERNEL_E4M3_MAX_ROWS_PER_EXPERT", 1 << 30)
    else:  # the paths of machines without the kernel
        monkeypatch.setattr(grouped.cpu_routed, "handles", lambda w: False)
    if path == "_per_expert":  # not the padded batch that machines without packing take for small groups
        monkeypatch.setattr(grouped, "SMALL_GROUP_ROWS", 0)
    store._stacks.clear()
    monkeypatch.setattr(grouped, "_all_experts_pays", lambda *a: path == "_all_experts")


@pytest.mark.parametrize("tokens", [1, 7, 40])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_grouped_path_equals_per_token_loop(store, tokens, path, monkeypatch):
    import services.expert.grouped as grouped

    _choose(path, grouped, store, monkeypatch)
    if path == "_batched":  # the path of devices without packed GEMMs
        monkeypatch.setattr(grouped.StackedExperts, "build", lambda r, g, d: grouped.StackedExperts(r, g, d))
        store._stacks.clear()
    taken = []
    for name in PATHS:
        real = getattr(grouped, name)
        monkeypatch.setattr(grouped, name, lambda *a, _n=name, _f=real: taken.append(_n) or _f(*a))
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, store.cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])
    w = torch.rand(tokens, 4, generator=g)
    ours = grouped_expert_forward(hidden, idx, w, _Source(store, 1, True), 16)
    store._stacks.clear()  # the next test builds its own
    assert taken == [path]
    torch.testing.assert_close(ours, _reference(store, hidden, idx, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_the_kernel_on_e4m3_weights_equals_it_on_their_dense_copy(store, tokens, monkeypatch):
    """The kernel reading the e4m3 stack (what it prefers where it converts e4m3 in hardware) gives what it gives
    on the dequantized fp32 stack: the same weight values, sums equal to fp32 rounding."""
    import services.expert.grouped as grouped

    if cpu_routed.library() is None:
        pytest.skip("no C compiler: no CPU kernel")
    monkeypatch.setattr(grouped, "KERNEL_MAX_ROWS_PER_EXPERT", 1 << 30)
    monkeypatch.setattr(grouped, "KERNEL_E4M3_MAX_ROWS_PER_EXPERT", 1 << 30)
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, store.cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])
    w = torch.rand(tokens, 4, generator=g)
    kinds = []
    real = grouped._routed_kernel
    monkeypatch.setattr(grouped, "_routed_kernel", lambda h, p, k, r: kinds.append(k.gate.dtype) or real(h, p, k, r))
    monkeypatch.setattr(cpu_routed, "fast_e4m3", lambda: True)
    on_e4m3 = grouped_expert_forward(hidden, idx, w, _Source(store, 1, True), 16)
    monkeypatch.setattr(cpu_routed, "fast_e4m3", lambda: False)
    on_dense = grouped_expert_forward(hidden, idx, w, _Source(store, 1, True), 16)
    assert kinds == [torch.float8_e4m3fn, torch.float32]
    torch.testing.assert_close(on_e4m3, on_dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(on_e4m3, _reference(store, hidden, idx, w), rtol=1e-5, atol=1e-5)


def test_without_a_stack_experts_run_one_by_one(store):
    hidden = torch.randn(40, store.cfg.hidden_size)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(40)])
    w = torch.rand(40, 4)
    ours = grouped_expert_forward(hidden, idx, w, _Source(store, 1, False), 16)
    torch.testing.assert_close(ours, _reference(store, hidden, idx, w), rtol=1e-5, atol=1e-5)


def test_decode_shapes_never_loop_over_experts(store, monkeypatch):
    import services.expert.grouped as grouped

    calls = []
    real = grouped._per_expert
    monkeypatch.setattr(grouped, "_per_expert", lambda *a: calls.append("loop") or real(*a))
    hidden = torch.randn(8, store.cfg.hidden_size)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(8)])
    grouped.grouped_expert_forward(hidden, idx, torch.rand(8, 4), _Source(store, 1, True), 16)
    assert calls == []  # 8 tokens x 4 experts over 16 held: the kernel or one packed chain, no per-expert loop


def test_partial_store_refuses_experts_it_does_not_hold(tiny_fp8):
    s = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=True)
    s.load(1, 2)
    s.load(1, 5)
    assert s.stacked(1).row_of_expert.tolist().count(-1) == 14
    hidden = torch.randn(3, s.cfg.hidden_size)
    ok = grouped_expert_forward(hidden, torch.tensor([[2, 5]] * 3), torch.ones(3, 2), _Source(s, 1, True), 16)
    assert ok.shape == hidden.shape
    with pytest.raises(ExpertNotHeldError, match="expert 9"):
        grouped_expert_forward(hidden, torch.tensor([[2, 9]] * 3), torch.ones(3, 2), _Source(s, 1, True), 16)
    with pytest.raises(InvalidRequestError, match="not an MoE layer"):
        s.load(0, 1)
    s.unload(1, 5)
    assert s.loaded() == [(1, 2)] and s.stacked(1).gate_up.shape[0] == 1


@pytest.mark.parametrize("path", ["_per_expert", "_all_experts", "_routed_kernel"])
def test_reduced_precision_compute_stays_within_bfloat16_rounding(store, path, monkeypatch):
    """fp8/bf16 dispatch is computed in bfloat16 (on hardware with native bf16) from the FP8 weights rounded to
    bfloat16: within bfloat16's rounding of the exact float32 result, with a stack of its own per dtype."""
    import services.expert.grouped as grouped

    _choose(path, grouped, store, monkeypatch, torch.bfloat16)
    taken = []
    real = getattr(grouped, path)
    monkeypatch.setattr(grouped, path, lambda *a: taken.append(path) or real(*a))
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(24, store.cfg.hidden_size, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(24)])
    w = torch.rand(24, 4, generator=g)
    ours = grouped_expert_forward(hidden, idx, w, LayerWeights(store, 1, torch.bfloat16), 16)
    assert ours.dtype == torch.bfloat16
    assert store.stacked(1, torch.bfloat16).gate_up.dtype == torch.bfloat16
    assert store.stacked(1).gate_up.dtype == torch.float32  # the exact path keeps its own
    ref = _reference(store, hidden.float(), idx, w)
    rel = float((ours.float() - ref).norm() / ref.norm())
    assert taken == [path] and 0 < rel < 0.01, (taken, rel)
    store._stacks.clear()


def test_compute_dtype_per_dispatch_format():
    from services.dispatch.precision import compute_dtype, reduced_compute_dtype

    assert compute_dtype(torch.float32) == torch.float32  # fp32 dispatch is exact
    assert compute_dtype(torch.float8_e4m3fn) == compute_dtype(torch.bfloat16) == reduced_compute_dtype()
    assert reduced_compute_dtype("cuda") == torch.bfloat16


def test_a_store_without_dense_copies_runs_its_e4m3_bytes_through_the_kernel(tiny_fp8, store, monkeypatch):
    """A CPU store that keeps only the FP8 weights (cache_dense=False) computes decode batches from the e4m3 bytes
    in the C kernel: the same numbers as the kernel over the dense fp32 stack (bit for bit with 16 lanes; the
    8-lane build contracts some products into FMAs differently, so the last bit may differ)."""
    import services.expert.grouped as grouped

    if cpu_routed.library() is None:
        pytest.skip("no C compiler: no CPU kernel")
    monkeypatch.setattr(cpu_routed, "fast_e4m3", lambda: False)  # the dense store on its fp32 stack
    fp8_store = ExpertStore(CheckpointReader(tiny_fp8), cache_dense=False)
    for e in range(fp8_store.cfg.n_routed_experts):
        fp8_store.load(1, e)
    taken = []
    real = grouped._routed_kernel
    monkeypatch.setattr(grouped, "_routed_kernel", lambda *a: taken.append(a[2].gate.dtype) or real(*a))
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(6, fp8_store.cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(6)])
    w = torch.rand(6, 4, generator=g)
    ours = grouped_expert_forward(hidden, idx, w, LayerWeights(fp8_store, 1), 16)
    dense = grouped_expert_forward(hidden, idx, w, _Source(store, 1, True), 16)
    store._stacks.clear()
    assert taken == [torch.float8_e4m3fn, torch.float32]
    torch.testing.assert_close(ours, dense, rtol=1e-6, atol=1e-6)
    assert not fp8_store._stacks and not fp8_store._dense  # no dense copy was made
