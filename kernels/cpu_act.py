"""Per-token FP8 activations on the CPU as one C pass each way (kernels/cpu/act_fp8.c), built on first use; and
block-scaled FP8 weights dequantized by the same pass.

The torch references (kernels/reference.py) run act_quant as ~10 ops over the activations (abs, amax, clamp,
divide, clamp, convert, reshapes) and act_dequant plus the pool's finiteness check as ~5; at decode sizes each op
costs more in dispatch than in arithmetic, and the e4m3 conversions run 5-9 ns an element on CPUs without
AVX-512 (torch's weight_dequant 6-16 ns a weight). The kernels give the references' results bit for bit.
act_quant falls back to the reference for input holding a NaN or an infinity (whose NaN rules are then torch's
exactly) and where the kernels are not built.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.cpu_build import check_status, library

DEQUANT_KINDS = {torch.float32: 0, torch.bfloat16: 1}
WEIGHTS_PER_THREAD = 1 << 20  # weight_dequant: below this many weights per thread, one thread


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.act_quant, for CPU tensors: [..., K] -> (e4m3 [..., K], fp32 scales [..., ceil(K/128)])."""
    lib = library()
    k = x.shape[-1] if x.dim() else 0
    if lib is None or x.device.type != "cpu" or k == 0:
        return reference.act_quant(x)
    x2 = x.reshape(-1, k).to(torch.float32)  # [T, K]: a view where it can be
    if x2.stride(1) != 1 or x2.stride(0) < k:
        x2 = x2.contiguous()
    t = x2.shape[0]
    q = torch.empty(t, k, dtype=reference.FP8_DTYPE)
    s = torch.empty(t, -(-k // reference.BLOCK))
    rc = lib.em_act_quant(x2.data_ptr(), t, k, x2.stride(0) if t > 1 else k, q.data_ptr(), s.data_ptr())
    if rc == 1:  # a NaN or an infinity: torch's rules for them
        return reference.act_quant(x)
    check_status(rc, "act_quant", {})
    return q.view(*x.shape), s.view(*x.shape[:-1], s.shape[1])


def act_dequant_finite(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, bool]:
    """reference.act_dequant and whether every value came out finite, for contiguous [T, K] e4m3 and [T,
    ceil(K/128)] fp32 CPU tensors, in one pass. -> ([T, K] in `dtype`, finite); when not finite, the values
    are not to be used."""
    lib = library()
    if lib is None or dtype not in DEQUANT_KINDS or q.device.type != "cpu" or q.dim() != 2 or q.shape[1] == 0:
        x = reference.act_dequant(q, scale, dtype)
        return x, bool(torch.isfinite(x).all())
    t, k = q.shape
    if q.dtype != reference.FP8_DTYPE or scale.dtype != torch.float32 or scale.shape != (t, -(-k // 128)):
        raise ValueError(
            f"e4m3 [T, K] and fp32 [T, ceil(K/128)] scales, got {q.dtype} {tuple(q.shape)} "
            f"and {scale.dtype} {tuple(scale.shape)}"
        )
    q, scale = q.contiguous(), scale.contiguous()
    return _dequant(lib, q.data_ptr(), scale.data_ptr(), t, k, dtype)


def act_dequant_bytes(q: bytes, scale: bytes, t: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool] | None:
    """act_dequant_finite on the raw bytes of e4m3 [t, k] and fp32 scales [t, ceil(k/128)] as they came over the
    wire (the caller has checked their lengths): no copy into tensors first. None where the kernel is not built
    or `dtype` is not one it writes."""
    lib = library()
    if lib is None or dtype not in DEQUANT_KINDS or t <= 0 or k <= 0:
        return None
    return _dequant(lib, q, scale, t, k, dtype)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """reference.weight_dequant for a CPU [N, K] e4m3 weight and its [ceil(N/128), ceil(K/128)] block scales, in
    one pass (rows split over torch's threads for large weights). The reference runs where the kernel is not
    built, for other dtypes or shapes (it names what is wrong), and where an output is not finite (torch's NaN
    rules then)."""
    lib = library()
    n, k = q.shape if q.dim() == 2 else (0, 0)
    usable = lib is not None and dtype in DEQUANT_KINDS and q.device.type == "cpu" and n > 0 and k > 0
    if not usable or q.dtype != reference.FP8_DTYPE or scale_inv.shape != (-(-n // 128), -(-k // 128)):
        return reference.weight_dequant(q, scale_inv, dtype)
    qc, sc = q.contiguous(), scale_inv.to(torch.float32).contiguous()
    out = torch.empty(n, k, dtype=dtype)
    threads = max(1, min(torch.get_num_threads(), n * k // WEIGHTS_PER_THREAD))
    rc = lib.em_fp8_dequant(qc.data_ptr(), sc.data_ptr(), n, k, 128, DEQUANT_KINDS[dtype], out.data_ptr(), threads)
    if rc == 1:
        return reference.weight_dequant(q, scale_inv, dtype)
    check_status(rc, "weight_dequant", {})
    return out


def _dequant(lib, q, scale, t: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The kernel on e4m3 [t, k] and fp32 scales (addresses, or bytes objects) -> ([t, k] in `dtype`, finite)."""
    out = torch.empty(t, k, dtype=dtype)
    rc = lib.em_act_dequant(q, scale, t, k, DEQUANT_KINDS[dtype], out.data_ptr())
    if rc not in (0, 1):
        check_status(rc, "act_dequant", {})
    return out, rc == 0
