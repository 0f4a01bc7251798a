"""Triton FP8 kernels: act_quant, weight_dequant and the block-scaled fp8_gemm.

Semantics are those of `kernels/reference.py`. On CUDA they compile; on CPU they run only under
TRITON_INTERPRET=1 (tests, small shapes). Before the fp32 -> e4m3 cast we clamp to +-448 and round the
mantissa to 3 bits (round to nearest even) ourselves: on the GPU that is exactly what the hardware cast does,
and it sidesteps the interpreter's broken downcast (no carry into the exponent, no saturation; Triton 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import ACT_AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX


@triton.jit
def _round_to_e4m3_grid(x):
    """Clamp to the e4m3 range and round the fp32 mantissa to 3 bits, ties to even (normal range)."""
    x = tl.clamp(x, -448.0, 448.0)
    xi = x.to(tl.int32, bitcast=True)
    xi = (xi + 0x7FFFF + ((xi >> 20) & 1)) & -1048576
    return xi.to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, KB, AMAX_FLOOR: tl.constexpr, FMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    kb = tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), AMAX_FLOOR)
    s = amax / FMAX
    y = _round_to_e4m3_grid(x / s)
    tl.store(y_ptr + row * K + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * KB + kb, s)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (e4m3 [..., K], fp32 [..., ceil(K/128)]): one scale per token per 128 channels."""
    x = x.contiguous()
    k = x.shape[-1]
    kb = triton.cdiv(k, BLOCK)
    rows = x.numel() // k
    y = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(*x.shape[:-1], kb, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(rows, kb)](x, y, s, k, kb, AMAX_FLOOR=ACT_AMAX_FLOOR, FMAX=FP8_MAX, BLOCK_K=BLOCK)
    return y, s


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, KB, BLOCK_SIZE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    cols = pid_k * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_n * KB + pid_k)
    tl.store(y_ptr + offs, (q * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] e4m3 with [ceil(N/128), ceil(K/128)] scales -> [N, K] in `dtype`; partial blocks masked."""
    n, k = q.shape
    nb, kb = triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)
    if tuple(scale_inv.shape) != (nb, kb):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(q.shape)} in 128x128 blocks")
    y = torch.empty(n, k, dtype=dtype, device=q.device)
    _weight_dequant_kernel[(nb, kb)](q.contiguous(), scale_inv.contiguous().float(), y, n, k, kb, BLOCK_SIZE=BLOCK)
    return y


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    M,
    N,
    K,
    KB,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k_idx = kb * BLOCK_K + offs_k
        k_mask = k_idx < K
        a = tl.load(a_ptr + offs_m[:, None] * K + k_idx[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * K + k_idx[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        a_s = tl.load(a_s_ptr + offs_m * KB + kb, mask=m_mask, other=0.0)  # [BLOCK_M]
        b_s = tl.load(b_s_ptr + (offs_n // BLOCK_K) * KB + kb, mask=n_mask, other=0.0)  # [BLOCK_N]
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], c, mask=m_mask[:, None] & n_mask[None, :])


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_m: int = 32,
    block_n: int = 64,
) -> torch.Tensor:
    """[..., K] e4m3 activations x [N, K] e4m3 weight -> [..., N], block scales applied per 128 of K."""
    k = a.shape[-1]
    n = b.shape[0]
    kb = triton.cdiv(k, BLOCK)
    a2 = a.reshape(-1, k).contiguous()
    m = a2.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        a2,
        b.contiguous(),
        c,
        a_scale.reshape(m, kb).contiguous().float(),
        b_scale.contiguous().float(),
        m,
        n,
        k,
        kb,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK,
    )
    return c.reshape(*a.shape[:-1], n)
