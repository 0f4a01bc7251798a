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

from kernels.cpu_build import library

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
    q: torch.Tensor,
    cache: torch.Tensor,
    key_slots: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_len: torch.Tensor,
    c: int,
    scale: float,
) -> torch.Tensor:
    """q [T, nh, D] (absorbed q_nope | roped q_pe), cache [slots, D] (one layer: latent | roped k_pe) -> [T, nh, C]
    = softmax(scale * q . keys) . values, values the first C of each key row. Sequence b's new tokens are q rows
    q_start[b] .. + q_len[b], the last q_len[b] of its k_len[b] keys at cache slots key_slots[b, :k_len[b]];
    each sees the keys up to its own position. Every index is checked before anything is computed."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available")
    t, nh, d = q.shape
    if q.dtype != torch.float32 or cache.dtype != torch.float32:
        raise ValueError(f"query rows of {q.dtype} and a cache of {cache.dtype}: the kernel reads float32")
    if cache.dim() != 2 or cache.shape[1] != d or not 0 < c <= d:
        raise ValueError(f"a cache of {tuple(cache.shape)} for query rows of {d} values, {c} of them latent")
    b = len(q_len)
    if key_slots.dim() != 2 or key_slots.shape[0] != b or not len(q_start) == len(k_len) == b:
        raise ValueError(
            f"{b} sequences with key slots {tuple(key_slots.shape)}, {len(q_start)} starts, {len(k_len)} ends"
        )
    if not cache.is_contiguous():
        raise ValueError("the cache layer must be contiguous")
    q = q.contiguous()
    key_slots, q_start, q_len, k_len = (x.to(torch.int64).contiguous() for x in (key_slots, q_start, q_len, k_len))
    out = torch.empty(t, nh, c)  # [T, nh, C]
    work = int((q_len * k_len).sum()) * nh * (d + c) if b else 0
    threads = max(1, min(torch.get_num_threads(), work // WORK_PER_THREAD))
    rc = lib.em_latent_attention(
        q.data_ptr(),
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
        out.data_ptr(),
        threads,
    )
    if rc == -2:
        raise ValueError("a sequence's new tokens lie outside the step, or it has more new tokens than keys")
    if rc == -3:
        raise ValueError(f"a key slot lies outside the cache's {cache.shape[0]} slots")
    if rc == -4:
        raise MemoryError("the CPU attention kernel could not allocate its scratch")
    if rc != 0:
        raise RuntimeError(f"the CPU attention kernel failed ({rc})")
    return out
