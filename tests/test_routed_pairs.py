"""Top-k routing as flat pairs: flattened in one place, split over owners and joined back without loss."""

from __future__ import annotations

import torch

from services.dispatch import codec
from services.math.routed_pairs import RoutedPairs


def test_from_topk_is_token_major():
    idx = torch.tensor([[3, 1], [0, 3]])  # [T, K]
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    pairs = RoutedPairs.from_topk(idx, w)
    assert pairs.token.tolist() == [0, 0, 1, 1]
    assert pairs.expert.tolist() == [3, 1, 0, 3]
    assert pairs.weight.dtype == torch.float32 and pairs.weight.tolist() == [0.25, 0.75, 0.5, 0.5]
    assert len(pairs) == 4


def test_split_for_pools_then_joined_keeps_every_pair():
    """The gateway's split (services.dispatch.codec.split_for_pools): each pool's pairs, in order, name rows of
    its own request; joined back (failover) they are every pair of the batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=g)
    pairs = RoutedPairs.from_topk(torch.randint(0, 16, (9, 4), generator=g), torch.rand(9, 4, generator=g))
    owner = torch.randint(0, 3, (len(pairs),), generator=g)  # [P]
    shares = codec.split_for_pools(codec.DispatchRows(x, "fp32"), pairs, owner, 3)
    assert [s.owner for s in shares] == sorted(set(owner.tolist()))
    for share in shares:
        mine = share.pairs()
        assert torch.equal(mine.expert, pairs.expert[owner == share.owner])
        assert torch.equal(mine.token, pairs.token[owner == share.owner])
        assert sorted(share.tokens.tolist()) == sorted(set(mine.token.tolist()))  # each row once
        assert torch.equal(share.tokens[torch.from_numpy(share.packed[:, 0]).long()], mine.token)
        assert torch.equal(torch.from_numpy(share.hidden.copy()).view(torch.float32), x[share.tokens])
    joined = RoutedPairs.cat([s.pairs() for s in shares])
    key = lambda p: sorted(zip(p.token.tolist(), p.expert.tolist(), p.weight.tolist()))  # noqa: E731
    assert key(joined) == key(pairs)
    assert len(RoutedPairs.cat([])) == 0
