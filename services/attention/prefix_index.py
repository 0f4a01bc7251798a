"""Automatic prefix caching: full cache blocks found again by the tokens that fill them.

A full block of the latent cache holds what every layer computed for its tokens, and those entries depend only on
the tokens up to and including them. So a block is named by a chain hash, of its tokens and of the hash of the
block before it (the whole prefix, not the block alone), and a new sequence whose prompt starts with the same
tokens takes the same blocks instead of computing them again (as vLLM's automatic prefix caching and SGLang's
radix cache do). Shared blocks are read, never written: a sequence only writes positions past its own length, and
a match ends on a block boundary.

A cached block nobody holds stays where it is, named, until its room is needed: the cache hands out never-named
blocks first, then evicts the least recently released named ones (a sequence's last block first, so a prefix's
first blocks, shared by the most prompts, go last). The index only keeps names and that order; the cache
(kv_cache.py) owns the blocks and their reference counts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence

ROOT = b""  # the hash before a sequence's first block


def salted_root(salt: str | None) -> bytes:
    """The start of the chain for requests that carry `salt` (vLLM's `cache_salt`): prompts with different salts
    name their blocks differently, so they share nothing (one tenant cannot tell, by timing, what another sent)."""
    return ROOT if salt is None else hashlib.blake2b(b"salt:" + salt.encode(), digest_size=16).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a block holding `tokens` after the prefix named `parent` (128 bits of BLAKE2b: a collision,
    which would serve another prefix's entries, is out of reach)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def chain_hashes(tokens: Sequence[int], block_size: int, parent: bytes = ROOT) -> Iterator[bytes]:
    """The names of the full blocks that `tokens` fill, in order, continuing the chain from `parent` (computed
    as they are read: a lookup that stops at the first miss hashes no further)."""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        yield parent


class PrefixIndex:
    """Names of full blocks -> block ids, and the named blocks no sequence holds (evictable, oldest first)."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._name_of: dict[int, bytes] = {}
        self._unheld: OrderedDict[int, None] = OrderedDict()

    @property
    def evictable(self) -> int:
        """Named blocks that no sequence holds: free to be handed out again."""
        return len(self._unheld)

    def lookup(self, hashes: Iterator[bytes]) -> list[tuple[int, bytes]]:
        """The blocks (and names) of the longest run of `hashes` that are named, from the first."""
        found = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            found.append((block, h))
        return found

    def name(self, block: int, h: bytes) -> None:
        """`block` (full, written) holds the prefix named `h`, unless another block already does (two sequences
        computed the same prefix at once: the first keeps the name, the other block stays anonymous)."""
        if h not in self._block_of and block not in self._name_of:
            self._block_of[h] = block
            self._name_of[block] = h

    def is_named(self, block: int) -> bool:
        return block in self._name_of

    def is_unheld(self, block: int) -> bool:
        return block in self._unheld

    def park(self, block: int) -> None:
        """A named block's last holder let it go: kept, most recently released last."""
        self._unheld[block] = None

    def take(self, block: int) -> None:
        """A parked block is held again (a new sequence matched it)."""
        del self._unheld[block]

    def evict(self) -> int:
        """The least recently released unheld block, its name forgotten: free for any use."""
        block, _ = self._unheld.popitem(last=False)
        del self._block_of[self._name_of.pop(block)]
        return block
