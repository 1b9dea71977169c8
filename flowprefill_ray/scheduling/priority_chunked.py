"""Static priority by SLO class, chunked (vLLM's ``--scheduling-policy priority`` style).

A chunked policy (``chunked.py``): units of at most ``chunk_size`` tokens; at every chunk
boundary the idle worker packs pieces of requests of the class with the tightest TTFT target
first (the request's own target, so an explicit ``ttft_slo_s`` or an admission downgrade counts),
in arrival order within a class. Unlike EDF it never lets an older relaxed request go before
a newer urgent one, however close the relaxed one's deadline. ``chunk_order`` is not read.
"""

from __future__ import annotations

from .chunked import ChunkedPolicy
from .records import RequestRecord


class PriorityChunkedPolicy(ChunkedPolicy):
    name = "priority_chunked"

    def _order_value(self, rec: RequestRecord) -> tuple[float, float]:
        return rec.ttft_slo_s, rec.arrival_s
