"""Top-k routing as flat pairs: flattened in one place, split over owners and joined back without loss."""

from __future__ import annotations

import torch

from services.math.routed_pairs import RoutedPairs


def test_from_topk_is_token_major():
    idx = torch.tensor([[3, 1], [0, 3]])  # [T, K]
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    pairs = RoutedPairs.from_topk(idx, w)
    assert pairs.token.tolist() == [0, 0, 1, 1]
    assert pairs.expert.tolist() == [3, 1, 0, 3]
    assert pairs.weight.dtype == torch.float32 and pairs.weight.tolist() == [0.25, 0.75, 0.5, 0.5]
    assert len(pairs) == 4


def test_split_by_owner_then_joined_keeps_every_pair():
    g = torch.Generator().manual_seed(0)
    pairs = RoutedPairs.from_topk(torch.randint(0, 16, (9, 4), generator=g), torch.rand(9, 4, generator=g))
    owner = torch.randint(0, 3, (len(pairs),), generator=g)  # [P]
    parts = list(pairs.by_owner(owner))
    assert [o for o, _ in parts] == sorted(set(owner.tolist()))
    for o, part in parts:
        assert torch.equal(part.expert, pairs.expert[owner == o])
    joined = RoutedPairs.cat([p for _, p in parts])
    key = lambda p: sorted(zip(p.token.tolist(), p.expert.tolist(), p.weight.tolist()))  # noqa: E731
    assert key(joined) == key(pairs)
    assert len(RoutedPairs.cat([])) == 0
