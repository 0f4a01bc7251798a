"""Plain-torch references for the FP8 kernels. These define the semantics; the Triton kernels match them.

Formats (DeepSeek-V3):
  * weights: float8_e4m3fn [N, K] with fp32 `scale_inv` [ceil(N/128), ceil(K/128)]; W = q * scale_inv[n//128, k//128]
    (multiply, never divide; the last block of a dimension may be partial).
  * activations: per token, per 128 channels: s = max(amax, 1e-4) / 448, y = e4m3(x / s); x ~= y * s.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
ACT_AMAX_FLOOR = 1e-4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] block scales -> [rows, cols] per-element scales."""
    return scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] e4m3 weight and its block scales -> [N, K] weight in `dtype` (computed in fp32)."""
    n, k = q.shape
    if scale_inv.shape != (_cdiv(n, BLOCK), _cdiv(k, BLOCK)):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(q.shape)} in 128x128 blocks")
    return (q.to(torch.float32) * expand_block_scale(scale_inv.to(torch.float32), n, k)).to(dtype)


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (e4m3 [N, K], fp32 scale_inv [ceil(N/128), ceil(K/128)]), one scale per 128x128 block.

    Partial blocks are zero-padded before their amax is taken, as DeepSeek's conversion does.
    """
    n, k = w.shape
    nb, kb = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.to(torch.float32)
    blocks = padded.view(nb, BLOCK, kb, BLOCK)  # [nb, 128, kb, 128]
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [nb, kb]
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), scale


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] activations -> (e4m3 [..., K], fp32 scales [..., ceil(K/128)]); a partial last group is allowed."""
    k = x.shape[-1]
    kb = _cdiv(k, BLOCK)
    xf = x.to(torch.float32)
    if k % BLOCK:
        xf = torch.nn.functional.pad(xf, (0, kb * BLOCK - k))
    groups = xf.reshape(*x.shape[:-1], kb, BLOCK)  # [..., kb, 128]
    scale = groups.abs().amax(dim=-1).clamp_min(ACT_AMAX_FLOOR) / FP8_MAX  # [..., kb]
    y = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return y.reshape(*x.shape[:-1], kb * BLOCK)[..., :k].contiguous(), scale


def act_dequant(y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of act_quant: [..., K] e4m3 and [..., ceil(K/128)] scales -> [..., K] in `dtype`."""
    k = y.shape[-1]
    per_channel = scale.to(torch.float32).repeat_interleave(BLOCK, dim=-1)[..., :k]
    return (y.to(torch.float32) * per_channel).to(dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """c[m, n] = sum_kb (sum_{k in kb} a[m,k] b[n,k]) * a_scale[m,kb] * b_scale[n//128, kb], fp32 accumulation.

    a: [..., K] e4m3 with a_scale [..., ceil(K/128)]; b: [N, K] e4m3 weight with b_scale [ceil(N/128), ceil(K/128)].
    """
    k = a.shape[-1]
    n = b.shape[0]
    kb = _cdiv(k, BLOCK)
    a2 = a.reshape(-1, k).to(torch.float32)  # [M, K]
    a_s = a_scale.reshape(-1, kb).to(torch.float32)  # [M, kb]
    b_s = b_scale.to(torch.float32).repeat_interleave(BLOCK, 0)[:n]  # [N, kb]
    out = torch.zeros(a2.shape[0], n, dtype=torch.float32, device=a.device)
    bf = b.to(torch.float32)
    for j in range(kb):
        lo, hi = j * BLOCK, min(k, (j + 1) * BLOCK)
        partial = a2[:, lo:hi] @ bf[:, lo:hi].T  # [M, N]
        out += partial * a_s[:, j : j + 1] * b_s[None, :, j]
    return out.reshape(*a.shape[:-1], n).to(out_dtype)


# ---- grouped (routed experts) ----------------------------------------------------------------------------------
def _groups(counts: list[int], rows: list[int]):
    """(stacked row, first row, end row) of each non-empty group."""
    offset = 0
    for count, row in zip(counts, rows):
        if count:
            yield row, offset, offset + count
        offset += count


def grouped_fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    counts: list[int],
    rows: list[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows of `a` [P, K] (e4m3, scales [P, ceil(K/128)]) sorted into groups: group g is the next counts[g] rows,
    through stacked weight w[rows[g]] ([R, N, K] e4m3, scales [R, ceil(N/128), ceil(K/128)]). -> [P, N]."""
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float32, device=a.device)
    for row, lo, hi in _groups(counts, rows):
        out[lo:hi] = fp8_gemm(a[lo:hi], a_scale[lo:hi], w[row], w_scale[row])
    return out.to(out_dtype)


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
    """silu(gate product) * up product per group, in fp32 from the fp32 accumulations. -> [P, I]."""
    g = grouped_fp8_gemm(a, a_scale, gate, gate_scale, counts, rows)
    u = grouped_fp8_gemm(a, a_scale, up, up_scale, counts, rows)
    return (torch.nn.functional.silu(g) * u).to(out_dtype)


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
    """Routed experts' SwiGLU over x [P, H] (rows sorted by expert) -> [P, H], DeepSeek's inference path: x and the
    down projection's input are quantized to e4m3 per token per 128 channels (act_quant); gate/up [R, I, H] and
    down [R, H, I] are e4m3 stacks with 128x128 block scales; fp32 accumulation."""
    if x.shape[0] == 0:
        return x.new_zeros(0, down.shape[1], dtype=out_dtype)
    a, a_scale = act_quant(x)
    h = grouped_fp8_swiglu(a, a_scale, gate, gate_scale, up, up_scale, counts, rows)  # [P, I] fp32
    h, h_scale = act_quant(h)
    return grouped_fp8_gemm(h, h_scale, down, down_scale, counts, rows, out_dtype)
