"""Paged KV cache for decode: fixed-size blocks of token slots shared by many sequences.

A decode worker receives each request's KV from a prefill (a contiguous ``KVCache``) and copies it
into blocks of ``block_size`` token slots taken from one preallocated pool. Each sequence owns a
list of blocks (its block table); appending a token takes a new block only when the last one is
full, and freeing a sequence returns all of its blocks. This is the layout the
``decode_attention`` kernel reads: ``k_cache[layer]`` is ``[num_blocks, block_size, Hk, D]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from flowprefill_ray.model.errors import KVCacheFullError
from flowprefill_ray.model.kv import KVCache

__all__ = ["DecodeSlots", "KVCacheFullError", "PagedKVCache"]


@dataclass(frozen=True)
class DecodeSlots:
    """Where a decode step's new tokens go and what the attention kernel must read.

    ``block_ids[B]`` / ``offsets[B]``: the slot of each sequence's new token.
    ``block_tables[B, M]`` int32 (padded with 0) and ``seq_lens[B]`` int32 (new token included)
    are the ``decode_attention`` arguments.
    """

    block_ids: torch.Tensor
    offsets: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor


class PagedKVCache:
    """Block pool holding the KV of many sequences for batched decode.

    ``num_blocks`` blocks of ``block_size`` token slots per layer; memory is allocated once, up
    front (see ``nbytes``). Sequences are identified by any hashable ``seq_id``.
    """

    def __init__(
        self,
        config,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        # One tensor per K and V; k_cache[layer] is a contiguous [N, S, Hk, D] view.
        self.k_cache = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=dtype)
        # A stack: freed blocks are reused first, which keeps the working set small.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # ----------------------------------------------------------------- sizing
    @staticmethod
    def bytes_per_block(config, block_size: int = 16, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one block takes across all layers, K and V together."""
        elem = torch.empty((), dtype=dtype).element_size()
        return (
            2
            * config.num_hidden_layers
            * block_size
            * config.num_key_value_heads
            * config.head_dim
            * elem
        )

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (K and V), allocated at construction."""
        return self.k_cache.nbytes + self.v_cache.nbytes

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.used_blocks / self.num_blocks

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_len(self, seq_id: Hashable) -> int:
        """Tokens currently cached for ``seq_id``."""
        return self._lens[self._check_known(seq_id)]

    def can_add(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` tokens fits now."""
        return self.blocks_for(num_tokens) <= self.free_blocks

    # ---------------------------------------------------------- add / free
    def add(self, seq_id: Hashable, kv: KVCache) -> None:
        """Copy a prefilled sequence's KV (``kv.k``/``kv.v`` ``[L, T, Hk, D]``) into new blocks.

        Raises ``KVCacheFullError`` (and changes nothing) when the blocks are not free.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already in the KV cache")
        expected = (self.num_layers, self.num_kv_heads, self.head_dim)
        got = (kv.k.shape[0], kv.k.shape[2], kv.k.shape[3])
        if kv.k.dim() != 4 or got != expected or kv.v.shape != kv.k.shape:
            raise ValueError(
                f"KV of sequence {seq_id!r} has shape k={tuple(kv.k.shape)} "
                f"v={tuple(kv.v.shape)}; this cache holds [layers={expected[0]}, T, "
                f"kv_heads={expected[1]}, head_dim={expected[2]}]"
            )
        num_tokens = kv.k.shape[1]
        blocks = self._allocate(
            self.blocks_for(num_tokens), f"sequence {seq_id!r} ({num_tokens} tokens)"
        )
        if num_tokens:
            index = torch.tensor(blocks, device=self.device)
            for cache, src in ((self.k_cache, kv.k), (self.v_cache, kv.v)):
                padded = torch.zeros(
                    (self.num_layers, len(blocks) * self.block_size, *expected[1:]),
                    device=self.device,
                    dtype=self.dtype,
                )
                padded[:, :num_tokens] = src.to(device=self.device, dtype=self.dtype)
                cache[:, index] = padded.view(
                    self.num_layers, len(blocks), self.block_size, *expected[1:]
                )
        self._tables[seq_id] = blocks
        self._lens[seq_id] = num_tokens

    def free(self, seq_id: Hashable) -> int:
        """Release every block of ``seq_id``; returns how many blocks were freed."""
        blocks = self._tables.pop(self._check_known(seq_id))
        del self._lens[seq_id]
        self._free.extend(reversed(blocks))
        return len(blocks)

    def get_kv(self, seq_id: Hashable) -> KVCache:
        """Gather ``seq_id``'s cached KV back into a contiguous ``KVCache`` (a copy)."""
        blocks = self._tables[self._check_known(seq_id)]
        length = self._lens[seq_id]
        index = torch.tensor(blocks, device=self.device, dtype=torch.long)
        shape = (self.num_layers, len(blocks) * self.block_size, self.num_kv_heads, self.head_dim)
        k = self.k_cache[:, index].reshape(shape)[:, :length].clone()
        v = self.v_cache[:, index].reshape(shape)[:, :length].clone()
        return KVCache(k=k, v=v)

    # ------------------------------------------------------------- decode
    def append_slots(self, seq_ids: Sequence[Hashable]) -> DecodeSlots:
        """Reserve one new token slot for each sequence (a decode step) and return where.

        All or nothing: if the new blocks needed do not fit, ``KVCacheFullError`` is raised and
        no sequence grows.
        """
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a decode batch must not repeat a sequence: {list(seq_ids)}")
        for seq_id in seq_ids:
            self._check_known(seq_id)
        growing = [s for s in seq_ids if self._lens[s] == len(self._tables[s]) * self.block_size]
        new_blocks = self._allocate(len(growing), f"a decode step of {len(seq_ids)} sequence(s)")
        for seq_id, block in zip(growing, new_blocks, strict=True):
            self._tables[seq_id].append(block)

        block_ids, offsets = [], []
        for seq_id in seq_ids:
            pos = self._lens[seq_id]
            block_ids.append(self._tables[seq_id][pos // self.block_size])
            offsets.append(pos % self.block_size)
            self._lens[seq_id] = pos + 1
        width = max(len(self._tables[s]) for s in seq_ids) if seq_ids else 0
        tables = torch.zeros((len(seq_ids), width), dtype=torch.int32)
        for row, seq_id in enumerate(seq_ids):
            blocks = self._tables[seq_id]
            tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        lens = torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32)
        return DecodeSlots(
            block_ids=torch.tensor(block_ids, dtype=torch.long, device=self.device),
            offsets=torch.tensor(offsets, dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
            seq_lens=lens.to(self.device),
        )

    def write(self, layer: int, slots: DecodeSlots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's new ``k``/``v`` ``[B, Hk, D]`` at the slots from ``append_slots``."""
        self.k_cache[layer, slots.block_ids, slots.offsets] = k.to(self.dtype)
        self.v_cache[layer, slots.block_ids, slots.offsets] = v.to(self.dtype)

    # ------------------------------------------------------------ helpers
    def _allocate(self, count: int, what: str) -> list[int]:
        free = len(self._free)
        if count > free:
            error = KVCacheFullError(
                f"KV cache full: {what} needs {count} block(s) of {self.block_size} tokens but "
                f"only {free} of {self.num_blocks} are free ({self.num_blocks - free} used by "
                f"{len(self._tables)} sequence(s)); free finished sequences or give the cache "
                "more blocks"
            )
            # Numbers for callers that shed load (e.g. a decode worker deciding what to evict).
            error.blocks_needed, error.free_blocks = count, free
            raise error
        return [self._free.pop() for _ in range(count)]

    def _check_known(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id!r} is not in the KV cache")
        return seq_id
