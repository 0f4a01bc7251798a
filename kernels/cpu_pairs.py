"""Routed pairs on their way to the expert pools and in, one C pass each (kernels/cpu/routed_pairs.c).

The gateway splits a layer's (token, expert, weight) pairs over the pools they go to, and gives each pool's
tokens rows of their own; a pool checks the pairs it is sent. In torch each is a dozen small ops (masks, unique,
searchsorted, stacks, conversions) whose dispatch costs far more than the work at decode sizes. `split_pairs`
runs the C pass where it is built and the same in torch elsewhere (identical results); `check_pairs` is the
pool's fast path only (None where it cannot say: the caller's own checks then run and name what is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cpu_build import check_status, library


@dataclass(frozen=True)
class Split:
    """Pairs grouped by owner (pool index), each owner's in their original order."""

    pairs_of: list[int]  # [O] pairs of each owner
    rows_of: list[int]  # [O] distinct batch rows of each owner
    token: torch.Tensor  # [P] int64, owner by owner: the pair's batch row
    expert: torch.Tensor  # [P] int64
    weight: torch.Tensor  # [P] float32
    packed: torch.Tensor  # [P, 2] int32: (the pair's row among its owner's rows, expert)
    rows: torch.Tensor  # [sum(rows_of)] int64: each owner's batch rows, owner by owner, in order of first appearance

    def owners(self):
        """-> (owner, its first pair, pairs, its first row, rows) for each owner with pairs, ascending."""
        start = row0 = 0
        for owner, (n, r) in enumerate(zip(self.pairs_of, self.rows_of)):
            if n:
                yield owner, start, n, row0, r
            start += n
            row0 += r


def split_pairs(
    token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, owner: torch.Tensor, n_tokens: int, n_owners: int
) -> Split:
    """[P] pairs (token in [0, n_tokens)) and [P] owners in [0, n_owners) -> the Split."""
    lib = library()
    token, expert, owner = (t.to(torch.int64).contiguous() for t in (token, expert, owner))
    weight = weight.to(torch.float32).contiguous()
    if lib is None:
        return _split_torch(token, expert, weight, owner, n_tokens, n_owners)
    p = token.numel()
    counts = torch.empty(2, n_owners, dtype=torch.int64)
    out = torch.empty(4, p, dtype=torch.int64)  # token, expert, rows, and the weights' bytes
    packed = torch.empty(p, 2, dtype=torch.int32)
    weight_out = out[3].view(torch.float32)[:p]
    rc = lib.em_split_pairs(
        token.data_ptr(),
        expert.data_ptr(),
        weight.data_ptr(),
        owner.data_ptr(),
        p,
        n_tokens,
        n_owners,
        counts.data_ptr(),
        counts[1].data_ptr(),
        out[0].data_ptr(),
        out[1].data_ptr(),
        weight_out.data_ptr(),
        packed.data_ptr(),
        out[2].data_ptr(),
    )
    check_status(
        rc, "split_pairs", {-2: f"a pair's token is out of [0, {n_tokens})", -3: "an owner or expert is out of range"}
    )
    pairs_of, rows_of = counts.tolist()
    return Split(pairs_of, rows_of, out[0], out[1], weight_out, packed, out[2][: sum(rows_of)])


def _split_torch(token, expert, weight, owner, n_tokens: int, n_owners: int) -> Split:
    if token.numel() and not (0 <= int(token.min()) and int(token.max()) < n_tokens):
        raise ValueError(f"a pair's token is out of [0, {n_tokens})")
    if owner.numel() and not (0 <= int(owner.min()) and int(owner.max()) < n_owners):
        raise ValueError("an owner or expert is out of range")
    order = torch.argsort(owner, stable=True)
    token, expert, weight = token[order], expert[order], weight[order]
    pairs_of = torch.bincount(owner, minlength=n_owners).tolist()
    packed = torch.empty(token.numel(), 2, dtype=torch.int32)
    rows = torch.empty(token.numel(), dtype=torch.int64)
    rows_of, start, row0 = [], 0, 0
    for n in pairs_of:
        seg = token[start : start + n]
        uniq, inverse = torch.unique(seg, return_inverse=True)  # ascending
        first = torch.full((uniq.numel(),), n, dtype=torch.int64).scatter_reduce_(0, inverse, torch.arange(n), "amin")
        by_first = torch.argsort(first)  # the rows in order of first appearance
        rank = torch.empty_like(by_first)
        rank[by_first] = torch.arange(by_first.numel())
        packed[start : start + n, 0] = rank[inverse].to(torch.int32)
        packed[start : start + n, 1] = expert[start : start + n].to(torch.int32)
        rows[row0 : row0 + uniq.numel()] = uniq[by_first]
        rows_of.append(uniq.numel())
        start += n
        row0 += uniq.numel()
    return Split(pairs_of, rows_of, token, expert, weight, packed, rows[:row0])


def check_pairs(
    packed: bytes, weight: bytes, n_pairs: int, n_rows: int, n_experts: int, held: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A request's pairs as sent: `packed` the bytes of [P, 2] int32 (row, expert), `weight` of [P] float32 (the
    caller has checked their lengths), `held` [n_experts] bool or None -> (token, expert [P] int64, weight [P]
    float32) when every row, expert (held) and weight is good; None when one is not, or the kernel is not built."""
    lib = library()
    if lib is None:
        return None
    out = torch.empty(3, n_pairs, dtype=torch.int64)
    weight_out = out[2].view(torch.float32)[:n_pairs]
    if held is not None:
        held = held.contiguous().view(torch.uint8)  # bool: one byte each, 0 or 1
    rc = lib.em_check_pairs(
        packed,
        weight,
        n_pairs,
        n_rows,
        n_experts,
        held.data_ptr() if held is not None else None,
        out[0].data_ptr(),
        out[1].data_ptr(),
        weight_out.data_ptr(),
    )
    return (out[0], out[1], weight_out) if rc == 0 else None
