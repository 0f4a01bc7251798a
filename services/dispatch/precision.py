"""The dtype a pool computes routed experts in, per dispatch format and hardware.

fp32 dispatch is exact: float32 weights (dequantized from FP8) and activations. fp8 and bf16 dispatch already
round every activation to e4m3 (3 mantissa bits) or bfloat16 (7 mantissa bits); there the pool computes in
bfloat16 where the hardware has native bfloat16 dot products (CUDA, AVX512-BF16 or AMX CPUs), accumulating in
float32. The e4m3 values sent are exact in bfloat16, and rounding the dequantized FP8 weights to bfloat16 adds
at most bfloat16's rounding per weight: this trades that rounding for about half the layer time (accuracy and
timings measured on the trained test model: BENCHMARKS.md, third session, "Pools compute fp8 and bf16 dispatch
in bfloat16"). DeepSeek's own production path is coarser still (the down projection's input is re-quantized to
e4m3).

On CUDA, reduced-precision dispatch goes that way (`fp8_experts`): the experts stay e4m3 in GPU memory and run as
block-scaled FP8 grouped GEMMs (kernels.grouped_fp8_mlp), the activations and the down projection's input
quantized per token per 128 channels. fp32 dispatch stays exact there too (weights dequantized per call).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    if device_type == "cuda":
        return True
    cpu = torch.cpu
    return any(
        getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def reduced_compute_dtype(device_type: str = "cpu") -> torch.dtype:
    """The compute dtype for reduced-precision (fp8, bf16) dispatch on this hardware."""
    return torch.bfloat16 if native_bf16(device_type) else torch.float32


def compute_dtype(wire_dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype:
    """Activations sent as float32 are computed exactly; e4m3 and bfloat16 ones in the reduced dtype."""
    return torch.float32 if wire_dtype == torch.float32 else reduced_compute_dtype(device_type)


def fp8_experts(device_type: str = "cpu") -> bool:
    """Whether routed experts compute as block-scaled FP8 GEMMs (for reduced-precision dispatch) on this
    hardware: on CUDA. On CPU the experts are dequantized once instead (no FP8 GEMM is faster there)."""
    return device_type == "cuda"
