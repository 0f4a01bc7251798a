"""The CPU routed-expert kernel (kernels/cpu/routed_swiglu.c, built with the machine's compiler) against a
float64 per-pair reference: fp32, bf16 and e4m3 (block-scaled) weights, shapes that leave vector, row-block and
128-block tails, 1-9 tokens per expert, experts not routed at all, one and several threads; its argument checks;
and the fallback to torch when no compiler can build it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_routed
from kernels.reference import weight_dequant, weight_quant

pytestmark = pytest.mark.skipif(cpu_routed.library() is None, reason="no C compiler: no CPU kernel")


def _case(h: int, i: int, experts: int, tokens: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, 2 * i, h, generator=g) / h**0.5  # [R, 2I, H]
    down = torch.randn(experts, h, i, generator=g) / i**0.5  # [R, H, I]
    x = torch.randn(tokens, h, generator=g)  # [T, H]
    # a skewed routing: low experts get many tokens, some experts none
    expert = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) // 2 * 2  # [T, K]
    token = torch.arange(tokens).repeat_interleave(k)  # [P]
    weight = torch.rand(tokens * k, generator=g)  # [P]
    return x, gate_up, down, token, expert.flatten(), weight


def _reference(x, gate_up, down, token, expert, weight):
    out = torch.zeros(x.shape, dtype=torch.float64)
    i = down.shape[2]
    for t, e, w in zip(token.tolist(), expert.tolist(), weight.tolist()):
        gu = gate_up[e].double() @ x[t].double()
        out[t] += w * (down[e].double() @ (F.silu(gu[:i]) * gu[i:]))
    return out


def _run(x, gate_up, down, token, expert, weight, kernel_weights=None):
    kw = kernel_weights or cpu_routed.KernelWeights.dense(gate_up, down)
    return cpu_routed.routed_swiglu(x, kw, token, expert, weight)


def _quantized(w):
    """[R, N, K] -> e4m3 [R, N, K], scales [R, ceil(N/128), ceil(K/128)], dequantized fp32 [R, N, K]."""
    parts = [weight_quant(w[e]) for e in range(w.shape[0])]
    q, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return q, s, torch.stack([weight_dequant(q[e], s[e]) for e in range(w.shape[0])])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "h, i, tokens",
    [(320, 96, 1), (320, 96, 9), (70, 37, 5), (512, 128, 32), (33, 7, 3), (300, 150, 6)],  # every tail
)
def test_kernel_matches_float64_reference(h, i, tokens, threads, monkeypatch):
    monkeypatch.setattr(cpu_routed, "BYTES_PER_THREAD", 1)  # as many threads as allowed, even for small work
    torch.set_num_threads(threads)
    try:
        x, gate_up, down, token, expert, weight = _case(h, i, 12, tokens, 4, seed=h + tokens)
        ref = _reference(x, gate_up, down, token, expert, weight)
        ours = _run(x, gate_up, down, token, expert, weight)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
        # bf16 weights are read as bf16 and computed in fp32: exact against the bf16-rounded weights
        gb, db = gate_up.bfloat16(), down.bfloat16()
        ref_bf16 = _reference(x, gb, db, token, expert, weight)
        torch.testing.assert_close(_run(x, gb, db, token, expert, weight).double(), ref_bf16, rtol=1e-5, atol=1e-5)
        # e4m3 with block scales: each weight is the dequantized fp32 value, so the output equals the fp32 kernel's
        # on the dequantized copy (bit for bit where the compiler fuses both paths' products alike, as it does for
        # AVX-512; the 8-lane build differs in the last bit of some sums)
        i = down.shape[2]
        (gq, gs, g32), (uq, us, u32), (dq, ds, d32) = map(_quantized, (gate_up[:, :i], gate_up[:, i:], down))
        e4m3 = cpu_routed.KernelWeights.e4m3(gq, gs, uq, us, dq, ds)
        dense = _run(x, torch.cat([g32, u32], 1), d32, token, expert, weight)
        torch.testing.assert_close(_run(x, gate_up, down, token, expert, weight, e4m3), dense, rtol=1e-6, atol=1e-6)
        ref_e4m3 = _reference(x, torch.cat([g32, u32], 1), d32, token, expert, weight)
        torch.testing.assert_close(dense.double(), ref_e4m3, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(2)


def test_tokens_routed_to_nothing_stay_zero():
    x, gate_up, down, token, expert, weight = _case(64, 32, 8, 6, 2, seed=1)
    keep = token != 3  # token 3 has no pairs
    out = _run(x, gate_up, down, token[keep], expert[keep], weight[keep])
    assert out[3].abs().max() == 0 and out[2].abs().max() > 0


def test_bad_arguments_are_refused_before_anything_is_written():
    x, gate_up, down, token, expert, weight = _case(64, 32, 8, 6, 2, seed=2)
    kw = cpu_routed.KernelWeights.dense(gate_up, down)
    for bad_token in (token + 1, token - 1):
        with pytest.raises(ValueError, match="token is outside 0..5"):
            cpu_routed.routed_swiglu(x, kw, bad_token, expert, weight)
    for bad_row in (expert + 8, torch.where(expert == 2, -1, expert)):
        with pytest.raises(ValueError, match="stack row is outside 0..7"):
            cpu_routed.routed_swiglu(x, kw, token, bad_row, weight)
    with pytest.raises(ValueError, match="pairs of"):
        cpu_routed.routed_swiglu(x, kw, token[:-1], expert, weight)
    with pytest.raises(ValueError, match="activations"):
        cpu_routed.routed_swiglu(x[:, :-1], kw, token, expert, weight)
    with pytest.raises(ValueError, match="the kernel reads"):
        cpu_routed.KernelWeights.dense(gate_up, down.half())
    with pytest.raises(ValueError, match="disagree"):
        cpu_routed.KernelWeights.dense(gate_up, down[:, :, :-1])
    q = gate_up[:, :32].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block scales"):
        cpu_routed.KernelWeights.e4m3(
            q, torch.ones(8, 1, 2), q, torch.ones(8, 1, 1), down.to(q.dtype), torch.ones(8, 1, 1)
        )


def test_without_a_compiler_experts_run_through_torch(tmp_path):
    """A machine without a C compiler (CC names a missing one) or with the kernels turned off: nothing is built,
    the reason is logged, and routed experts, attention and the dispatch codec run through torch."""
    script = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from kernels import cpu_attention, cpu_routed
from kernels.reference import weight_dequant, weight_quant
from services.expert.grouped import StackedExperts
assert cpu_routed.library() is None and not cpu_attention.available()
from services.dispatch import codec
from services.math.routed_pairs import RoutedPairs
pairs = RoutedPairs.from_topk(torch.tensor([[0, 3], [2, 3]]), torch.rand(2, 2))
_, request = codec.encode_request(1, codec.DispatchRows(torch.randn(2, 256), "fp8"), pairs)
batch = codec.decode_request(request, 256, 4)
assert batch.hidden.shape == (2, 256) and batch.pairs.expert.tolist() == [0, 3, 2, 3]
s = StackedExperts.build(torch.arange(2), torch.randn(2, 8, 16), torch.randn(2, 16, 4))
print("packed" if s.gate_up_all is not None else "plain")
"""
    env = dict(os.environ, EXPERTMESH_KERNEL_CACHE=str(tmp_path / "k"))
    cases = (({"CC": str(tmp_path / "no-such-cc")}, "not built"), ({"EXPERTMESH_CPU_KERNELS": "off"}, "off"))
    for extra, says in cases:
        done = subprocess.run(
            [sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert says in done.stderr
        assert done.stdout.strip() in ("packed", "plain")  # the torch paths' stacks (packed where oneDNN is)
    assert not (tmp_path / "k").exists() or not list((tmp_path / "k").glob("*.so"))


def test_build_is_cached_per_source_and_cpu_and_a_damaged_one_rebuilt(tmp_path):
    env = dict(os.environ, EXPERTMESH_KERNEL_CACHE=str(tmp_path))
    script = "from kernels import cpu_routed; assert cpu_routed.library() is not None"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    built = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and len(list(tmp_path.iterdir())) == 1
    built[0].write_bytes(b"not a shared object")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert built[0].read_bytes()[:4] == b"\x7fELF"


@pytest.mark.slow  # builds the kernels a second time
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector widths")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-f16c"])
def test_the_8_lane_build_passes_the_kernel_tests_too(tmp_path, flags):
    """CPUs without AVX-512 (AVX2: most laptops, many cloud machines) get the kernels built for 8-float vectors:
    the compiler with -mno-avx512f after -march=native builds that form here, and the kernels' own tests run
    against it; with -mno-f16c too, the e4m3 conversion without fp16 hardware (simd.h)."""
    cc = tmp_path / "cc"
    real = os.environ.get("CC") or "cc"
    cc.write_text(f'#!/bin/sh\nexec {real} "$@" {flags}\n')
    cc.chmod(0o755)
    env = dict(os.environ, CC=str(cc), EXPERTMESH_KERNEL_CACHE=str(tmp_path / "k"))
    tests = [
        "tests/test_cpu_kernel.py",
        "tests/test_cpu_attention.py",
        "tests/test_varlen_attention.py",
        "tests/test_cpu_codec_kernels.py",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout  # built, and run: not skipped
    built = list((tmp_path / "k").glob("cpu_kernels-*.so"))
    assert len(built) == 1
    listing = subprocess.run(["objdump", "-d", str(built[0])], capture_output=True, text=True)
    if listing.returncode == 0:  # binutils at hand: no 512-bit register anywhere in the 8-lane build
        assert "zmm" not in listing.stdout and "ymm" in listing.stdout
