"""A bounded memory of ids (cancelled requests, ingress clients whose lease expired): an id
arriving after its cancel must still be recognised, but a long-lived actor cannot keep them all."""

from __future__ import annotations

from collections import OrderedDict


def remember(memory: OrderedDict[str, None], key: str, bound: int) -> None:
    """Add ``key`` to ``memory``, forgetting the oldest ids beyond ``bound``."""
    memory[key] = None
    while len(memory) > bound:
        memory.popitem(last=False)
