"""Prompt prefixes as chains of block hashes, and an LRU set of cached blocks.

A prompt is cut into full blocks of ``block_tokens`` tokens; block ``i``'s hash covers blocks
``0..i`` (chained), so two prompts share block ``i``'s hash exactly when they share every token
up to the end of that block. Traces such as Mooncake's carry these ids already (``hash_ids``);
a live scheduler computes them from token ids (``prefix_hashes``). A partial last block is never
cached: its KV is not reusable by a longer prompt.

Plain Python: the scheduler's view of each worker's cache and the simulator's model of the
caches themselves are both ``BlockLRU`` sets.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence


def prefix_hashes(tokens: Sequence[int], block_tokens: int, salt: str = "") -> tuple[int, ...]:
    """Chained 64-bit hashes of the full blocks of ``tokens``. A ``salt`` (a tenant's
    ``cache_salt``) enters the first block, so salted prompts never match other salts."""
    chained = hashlib.sha256(salt.encode()).digest()
    out = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = struct.pack(f"<{block_tokens}q", *tokens[start : start + block_tokens])
        chained = hashlib.sha256(chained + block).digest()
        out.append(int.from_bytes(chained[:8], "little"))
    return tuple(out)


def reusable_tokens(cached_blocks: int, block_tokens: int, prompt_tokens: int) -> int:
    """Tokens a prompt can take from its first ``cached_blocks`` cached blocks. The last prompt
    token is always computed: the first output token is sampled from its logits."""
    return max(0, min(cached_blocks * block_tokens, prompt_tokens - 1))


class BlockLRU:
    """A bounded set of block hashes, least recently used evicted first.

    Because hashes are chained, a prompt's cached prefix is the longest run of its leading
    hashes present here. Evicting a block can leave later blocks of the same chain behind;
    they are unreachable until the prefix is cached again, and age out like any other."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_blocks(self, hashes: Sequence[int]) -> int:
        """How many of ``hashes``' leading blocks are cached (a read: no recency change)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Iterable[int]) -> None:
        """Cache ``hashes`` (a prompt's blocks, in order) and mark them most recently used."""
        if self.capacity_blocks == 0:
            return
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
            self.evicted_blocks += 1
