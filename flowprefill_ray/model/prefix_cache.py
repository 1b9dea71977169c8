"""`PrefixCache`: KV of full prompt blocks kept after their prefill, reused by later prompts.

A prompt is cut into blocks of ``block_tokens`` tokens; only full blocks are cached (a partial
last block never is). Each block's key is a sha256 chained over every block before it (the
salt mixed into the first), so a key names the whole prefix up to that block: two prompts
share block ``k`` only if blocks ``0..k`` and their salts are equal token for token. Reuse is
exact or nothing; a hash match is the only test, and sha256 makes a collision out of reach.

Blocks are evicted least recently used first under a byte budget. A hit touches its blocks
last-to-first, so a chain's first block is its most recent one and a chain shrinks from its
tail: a block is never kept while the block before it is gone (it could never be reached).

Thread-safe: the compute thread looks up and inserts while control threads read ``stats``
and may call ``evict_to`` (a shared per-worker memory budget).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kv import KVCache

_ROOT = b"flowprefill-prefix-v1"


def block_hashes(
    token_ids: Sequence[int], block_tokens: int, salt: str | None = None
) -> list[bytes]:
    """The chained key of each full block of ``token_ids`` (a partial last block has none)."""
    previous = hashlib.sha256(_ROOT + b"\x00" + (salt or "").encode()).digest()
    # Salted and unsalted never collide, also for an empty salt.
    previous = hashlib.sha256(previous + (b"\x01" if salt is not None else b"\x00")).digest()
    keys = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        block = token_ids[start : start + block_tokens]
        digest = hashlib.sha256(previous)
        # Fixed-width little-endian ids: the encoding of a block is unambiguous.
        digest.update(b"".join(int(t).to_bytes(4, "little") for t in block))
        previous = digest.digest()
        keys.append(previous)
    return keys


@dataclass
class _Block:
    k: torch.Tensor  # [layers, block_tokens, Hk, D], its own storage (not a view of a prompt)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class PrefixHit:
    """The KV of the longest cached prefix: ``kv`` covers tokens ``[0, tokens)``."""

    tokens: int
    kv: KVCache


class PrefixCache:
    """Cached KV blocks, LRU under ``budget_bytes``; see the module docstring."""

    def __init__(self, block_tokens: int, budget_bytes: int):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.block_tokens = block_tokens
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recent first
        self._nbytes = 0
        self._query_tokens = 0
        self._hit_tokens = 0
        self._evicted_blocks = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the cached KV blocks."""
        with self._lock:
            return self._nbytes

    def lookup(
        self, token_ids: Sequence[int], salt: str | None = None, max_tokens: int | None = None
    ) -> PrefixHit | None:
        """The longest run of cached blocks at the start of ``token_ids``, at most
        ``max_tokens`` tokens long (whole blocks). Counts ``max_tokens`` (or the prompt) as
        queried and the hit as hit tokens. None on a miss."""
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        usable = limit // self.block_tokens
        keys = block_hashes(token_ids[: usable * self.block_tokens], self.block_tokens, salt)
        with self._lock:
            self._query_tokens += limit
            found = []
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                found.append((key, block))
            for key, _ in reversed(found):  # the first block ends up most recent
                self._blocks.move_to_end(key)
            self._hit_tokens += len(found) * self.block_tokens
        if not found:
            return None
        # A copy: the cache may evict these blocks while the request still runs.
        k = torch.cat([b.k for _, b in found], dim=1)
        v = torch.cat([b.v for _, b in found], dim=1)
        return PrefixHit(len(found) * self.block_tokens, KVCache(k, v))

    def insert(self, token_ids: Sequence[int], kv: KVCache, salt: str | None = None) -> int:
        """Keep the full blocks of a finished prefill (``kv`` covers at least ``token_ids``).
        Returns how many blocks were new. Evicts LRU blocks to stay within the budget."""
        tokens = min(len(token_ids), kv.num_tokens)
        keys = block_hashes(token_ids[:tokens], self.block_tokens, salt)
        if not keys or self.budget_bytes == 0:
            return 0
        with self._lock:
            missing = [i for i, key in enumerate(keys) if key not in self._blocks]
        # Copied outside the lock (a copy of a long prompt takes a while on CPU): each block
        # gets its own storage, so keeping it does not keep the whole prompt's KV alive.
        copies = {}
        for index in missing:
            span = slice(index * self.block_tokens, (index + 1) * self.block_tokens)
            copies[keys[index]] = _Block(kv.k[:, span].clone(), kv.v[:, span].clone())
        added = 0
        with self._lock:
            for key, block in copies.items():
                if key not in self._blocks:  # another insert may have raced this one
                    self._blocks[key] = block
                    self._nbytes += block.nbytes
                    added += 1
            for key in reversed(keys):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            self._evict_locked(self.budget_bytes)
        return added

    def evict_to(self, target_bytes: int) -> int:
        """Evict LRU blocks until at most ``target_bytes`` stay cached; returns bytes freed.
        For a shared per-worker memory budget: whoever needs room asks the cache to shrink."""
        with self._lock:
            return self._evict_locked(max(0, target_bytes))

    def _evict_locked(self, target_bytes: int) -> int:
        freed = 0
        while self._nbytes > target_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self._nbytes -= block.nbytes
            freed += block.nbytes
            self._evicted_blocks += 1
        return freed

    def clear(self) -> int:
        """Drop every block; returns bytes freed."""
        return self.evict_to(0)

    def stats(self) -> dict:
        with self._lock:
            return {
                "block_tokens": self.block_tokens,
                "blocks": len(self._blocks),
                "bytes": self._nbytes,
                "budget_bytes": self.budget_bytes,
                "query_tokens": self._query_tokens,
                "hit_tokens": self._hit_tokens,
                "evicted_blocks": self._evicted_blocks,
            }
