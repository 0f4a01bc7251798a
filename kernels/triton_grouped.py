"""Triton grouped FP8 GEMMs for routed experts: many experts' block-scaled e4m3 weights, one launch per piece.

The rows of `a` are (token, expert) pairs sorted by expert: group g is rows [offset_g, offset_g + count_g) and
uses stacked weight `rows[g]`. Each program computes one BLOCK_M x BLOCK_N tile of one group, so a group of one
token costs one tile and an expert with no tokens costs nothing. Tiles are laid out on the host from the group
counts (the caller knows them there: the pairs were sorted on the host), so no device sync is needed.

Semantics are those of `kernels/reference.py` (`grouped_fp8_gemm`, `grouped_fp8_swiglu`): activations e4m3 with
a scale per row per 128 channels, weights e4m3 with a scale per 128x128 block (partial blocks masked), fp32
accumulation, the scales applied per 128-wide K block. The SwiGLU piece computes the gate and up products of a
tile together (one read of the activations) and stores silu(gate) * up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import BLOCK, FP8_DTYPE
from kernels.triton_fp8 import act_quant

BLOCK_N = 64


@triton.jit
def _scaled_block(a, a_s, w_ptr, w_s_ptr, offs_n, n_mask, k_idx, k_mask, K, KB, kb, BLOCK_K: tl.constexpr):
    """One 128-wide K block of a tile: (a @ w^T) * a_scale * w_scale, fp32."""
    w = tl.load(w_ptr + offs_n[None, :] * K + k_idx[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0.0)
    w_s = tl.load(w_s_ptr + (offs_n // BLOCK_K) * KB + kb, mask=n_mask, other=0.0)  # [BLOCK_N]
    return tl.dot(a, w) * a_s[:, None] * w_s[None, :]


@triton.jit
def _grouped_kernel(
    a_ptr,
    a_s_ptr,
    w_ptr,
    w_s_ptr,
    w2_ptr,
    w2_s_ptr,
    c_ptr,
    tile_row_ptr,
    tile_start_ptr,
    tile_end_ptr,
    N,
    K,
    KB,
    NB,
    SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = tl.load(tile_row_ptr + tile).to(tl.int64)  # which stacked expert: int64, the stack passes 2**31 bytes
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < end
    n_mask = offs_n < N
    w_base = w_ptr + row * N * K
    w_s_base = w_s_ptr + row * NB * KB
    w2_base = w2_ptr + row * N * K
    w2_s_base = w2_s_ptr + row * NB * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k_idx = kb * BLOCK_K + offs_k
        k_mask = k_idx < K
        a = tl.load(a_ptr + offs_m[:, None] * K + k_idx[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a_s = tl.load(a_s_ptr + offs_m * KB + kb, mask=m_mask, other=0.0)  # [BLOCK_M]
        acc += _scaled_block(a, a_s, w_base, w_s_base, offs_n, n_mask, k_idx, k_mask, K, KB, kb, BLOCK_K)
        if SWIGLU:
            acc2 += _scaled_block(a, a_s, w2_base, w2_s_base, offs_n, n_mask, k_idx, k_mask, K, KB, kb, BLOCK_K)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], c, mask=m_mask[:, None] & n_mask[None, :])


def block_m_for(counts: list[int]) -> int:
    """Rows per tile: 16 (tl.dot's least) for decode-sized groups, up to 64 for prefill-sized ones."""
    largest = max(counts, default=0)
    return 16 if largest <= 16 else 32 if largest <= 32 else 64


def tile_schedule(
    counts: list[int], rows: list[int], block_m: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group counts and stacked rows -> per tile (stacked row, first row of a, end row of a), int32 on `device`."""
    tile_row, tile_start, tile_end = [], [], []
    offset = 0
    for count, row in zip(counts, rows):
        for start in range(offset, offset + count, block_m):
            tile_row.append(row)
            tile_start.append(start)
            tile_end.append(offset + count)
        offset += count
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32).to(device)  # noqa: E731
    return as_tensor(tile_row), as_tensor(tile_start), as_tensor(tile_end)


def _check(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, counts: list[int], rows: list[int]
) -> None:
    r, n, k = w.shape
    kb, nb = triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK)
    if a.dtype != FP8_DTYPE or w.dtype != FP8_DTYPE:
        raise TypeError(f"grouped FP8 GEMM takes e4m3 activations and weights, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or a.shape[1] != k or tuple(a_scale.shape) != (a.shape[0], kb):
        raise ValueError(f"activations {list(a.shape)} with scales {list(a_scale.shape)} do not fit K={k}")
    if tuple(w_scale.shape) != (r, nb, kb):
        raise ValueError(f"weight scales {list(w_scale.shape)} do not fit weights {list(w.shape)} in 128x128 blocks")
    if len(counts) != len(rows) or sum(counts) != a.shape[0] or any(c < 0 for c in counts):
        raise ValueError(f"group counts {counts} do not add up to the {a.shape[0]} rows")
    if any(not 0 <= x < r for x in rows):
        raise ValueError(f"stacked rows {rows} out of range [0, {r})")


def _launch(a, a_scale, w, w_scale, w2, w2_scale, counts, rows, out_dtype, swiglu: bool) -> torch.Tensor:
    _check(a, a_scale, w, w_scale, counts, rows)
    r, n, k = w.shape
    kb, nb = triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK)
    c = torch.empty(a.shape[0], n, dtype=out_dtype, device=a.device)
    block_m = block_m_for(counts)
    tile_row, tile_start, tile_end = tile_schedule(counts, rows, block_m, a.device)
    if tile_row.numel() == 0:
        return c
    grid = (tile_row.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_kernel[grid](
        a.contiguous(),
        a_scale.contiguous().float(),
        w.contiguous(),
        w_scale.contiguous().float(),
        w2.contiguous(),
        w2_scale.contiguous().float(),
        c,
        tile_row,
        tile_start,
        tile_end,
        n,
        k,
        kb,
        nb,
        SWIGLU=swiglu,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK,
    )
    return c


def grouped_fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a [P, K] e4m3 (rows sorted by group), a_scale [P, ceil(K/128)]; w [R, N, K] e4m3 stacked experts with
    w_scale [R, ceil(N/128), ceil(K/128)]; group g: counts[g] rows through w[rows[g]]. -> [P, N]."""
    return _launch(a, a_scale, w, w_scale, w, w_scale, counts, rows, out_dtype, swiglu=False)


def grouped_fp8_swiglu(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    gate: torch.Tensor,
    gate_scale: torch.Tensor,
    up: torch.Tensor,
    up_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """silu(a @ gate[g]^T) * (a @ up[g]^T) per group: gate and up [R, I, K] e4m3 with their block scales. -> [P, I]."""
    if gate.shape != up.shape or gate_scale.shape != up_scale.shape:
        raise ValueError(f"gate {list(gate.shape)} and up {list(up.shape)} must have one shape")
    return _launch(a, a_scale, gate, gate_scale, up, up_scale, counts, rows, out_dtype, swiglu=True)


def grouped_fp8_mlp(
    x: torch.Tensor,
    gate: torch.Tensor,
    gate_scale: torch.Tensor,
    up: torch.Tensor,
    up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """reference.grouped_fp8_mlp with the Triton act_quant and grouped kernels: three launches and two act_quants
    per MoE layer, whatever the number of experts."""
    if x.shape[0] == 0:
        return x.new_zeros(0, down.shape[1], dtype=out_dtype)
    a, a_scale = act_quant(x)
    h = grouped_fp8_swiglu(a, a_scale, gate, gate_scale, up, up_scale, counts, rows)  # [P, I] fp32
    h, h_scale = act_quant(h)
    return grouped_fp8_gemm(h, h_scale, down, down_scale, counts, rows, out_dtype)
