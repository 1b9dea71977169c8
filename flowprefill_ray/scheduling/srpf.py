"""Shortest remaining prefill first, chunked (SGLang-style): the least work left goes first.

A chunked policy (``chunked.py``): units of at most ``chunk_size`` tokens, and at every chunk
boundary the idle worker packs pieces of the requests with the fewest prompt tokens still to
compute (a request between chunks counts only what it has left, so a long prompt near its end
outranks a new medium one). Deadlines play no part: short prompts, which are most often the
urgent ones, rarely wait behind long ones, but a long prompt waits as long as shorter work
keeps arriving. ``chunk_order`` is not read.
"""

from __future__ import annotations

from .chunked import ChunkedPolicy
from .records import RequestRecord


class SRPFPolicy(ChunkedPolicy):
    name = "srpf"

    def _order_value(self, rec: RequestRecord) -> int:
        # Fixed while it waits: only a running chunk (or a prefix-cache hit) changes it.
        return rec.remaining_tokens
