"""`KVCache`: the keys and values of one sequence, all layers, contiguous."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys and values of one sequence: `k`, `v` are `[num_layers, T, Hk, D]` (T in tokens).

    Produced by a finished prefill (prefix chunks included) and consumed by the next chunk of
    the same prompt or by a decode worker.
    """

    k: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.dim() != 4:
            raise ValueError(
                f"KVCache needs k and v of equal shape [layers, T, Hk, D], got "
                f"{tuple(self.k.shape)} and {tuple(self.v.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory of k and v together, in bytes."""
        return self.k.nbytes + self.v.nbytes

    def to(self, device: torch.device | str) -> KVCache:
        """A copy on `device` (same dtype)."""
        return KVCache(self.k.to(device), self.v.to(device))
