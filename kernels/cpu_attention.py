"""Absorbed MLA attention on the CPU as one C kernel (kernels/cpu/latent_attention.c), read straight from the
paged latent cache.

torch runs a step's attention as a gather of every sequence's context out of the cache, a padded score tensor
[B, S, nh, L], a mask, a softmax and two batched GEMMs; for a few query rows against a long context each is a
pass over memory, and the GEMMs run far from peak at so few rows. The kernel makes one pass over each
sequence's keys (in the absorbed form all heads read the same latent row), with an online softmax, causal per
new token, no padding: the cost is the sum over sequences of its query rows x its keys.

kernels/cpu_build.py builds it at first use; where it cannot, `available()` is False and MLA uses torch.
"""

from __future__ import annotations

import torch

from kernels.cpu_build import check_status, library

# below this many multiply-adds, one thread (starting a second costs more than it saves)
WORK_PER_THREAD = 1 << 20


def available() -> bool:
    return library() is not None


def handles(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the kernel can attend these (fp32 CPU query rows and cache, once built)."""
    return (
        q.device.type == "cpu"
        and cache.device.type == "cpu"
        and q.dtype == torch.float32
        and cache.dtype == torch.float32
        and available()
    )


def latent_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    key_slots: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_lat [T, nh, C] (absorbed q_nope) and q_pe [T, nh, R] (roped), any token and head strides; cache
    [slots, C + R] (one layer: latent | roped k_pe) -> [T, nh, C] = softmax(scale * q . keys) . values, values the
    first C of each key row, laid out head-major (a view of [nh, T, C], ready for the per-head W_UV GEMM).
    Sequence b's new tokens are rows q_start[b] .. + q_len[b], the last q_len[b] of its k_len[b] keys at cache
    slots key_slots[b, :k_len[b]]; each sees the keys up to its own position. Every index is checked before
    anything is computed."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available")
    if q_lat.dim() != 3 or q_pe.dim() != 3 or q_lat.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"query parts of {tuple(q_lat.shape)} and {tuple(q_pe.shape)}: both [T, nh, ...]")
    t, nh, c = q_lat.shape
    d = c + q_pe.shape[2]
    if q_lat.dtype != torch.float32 or q_pe.dtype != torch.float32 or cache.dtype != torch.float32:
        raise ValueError(f"query rows of {q_lat.dtype} and a cache of {cache.dtype}: the kernel reads float32")
    if cache.dim() != 2 or cache.shape[1] != d or c <= 0:
        raise ValueError(f"a cache of {tuple(cache.shape)} for query rows of {c} latent + {d - c} rope values")
    b = len(q_len)
    if key_slots.dim() != 2 or key_slots.shape[0] != b or not len(q_start) == len(k_len) == b:
        raise ValueError(
            f"{b} sequences with key slots {tuple(key_slots.shape)}, {len(q_start)} starts, {len(k_len)} ends"
        )
    if not cache.is_contiguous():
        raise ValueError("the cache layer must be contiguous")
    q_lat, q_pe = (x if x.stride(2) == 1 else x.contiguous() for x in (q_lat, q_pe))
    key_slots, q_start, q_len, k_len = (x.to(torch.int64).contiguous() for x in (key_slots, q_start, q_len, k_len))
    out = torch.empty(nh, t, c)  # [nh, T, C]
    work = int((q_len * k_len).sum()) * nh * (d + c) if b else 0
    threads = max(1, min(torch.get_num_threads(), work // WORK_PER_THREAD))
    rc = lib.em_latent_attention(
        *(q_lat.data_ptr(), q_lat.stride(0), q_lat.stride(1)),
        *(q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1)),
        t,
        nh,
        c,
        d,
        cache.data_ptr(),
        cache.shape[0],
        key_slots.data_ptr(),
        key_slots.shape[1],
        q_start.data_ptr(),
        q_len.data_ptr(),
        k_len.data_ptr(),
        b,
        scale,
        *(out.data_ptr(), out.stride(1), out.stride(0)),
        threads,
    )
    check_status(
        rc,
        "attention",
        {
            -2: "a sequence's new tokens lie outside the step, or it has more new tokens than keys",
            -3: f"a key slot lies outside the cache's {cache.shape[0]} slots",
        },
    )
    return out.transpose(0, 1)  # [T, nh, C]
