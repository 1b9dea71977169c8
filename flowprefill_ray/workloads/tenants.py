"""Several tenants' traffic as one trace: each tenant a trace of its own and one SLO class.

A shared deployment serves tenants with different latency promises at once, e.g. a chat
product (short prompts, tight TTFT) next to a coding assistant (long prompts, loose TTFT).
``merge_tenants`` interleaves their traces by arrival time, each request labelled with its
tenant's class, so one replay offers both loads together as they would meet in production.
Each trace keeps its own arrival pattern (both start at 0): the merged rate is the sum.

Tenants do not share prompts: the hash ids of each tenant after the first are shifted past
the previous tenants' largest id, so two traces that both number their blocks from 0 do not
appear to share prefixes. Tenants with hash ids must agree on the block size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .trace import TraceRecord, Workload


def merge_tenants(tenants: Sequence[tuple[Workload, str]]) -> Workload:
    """One workload of every ``(workload, slo_class)`` pair's requests, sorted by arrival,
    every request carrying its tenant's class (any class a trace had is replaced)."""
    if not tenants:
        raise ValueError("merge_tenants needs at least one (workload, slo_class) pair")
    records: list[TraceRecord] = []
    block_sizes = {w.block_tokens for w, _ in tenants if w.block_tokens is not None}
    if len(block_sizes) > 1:
        raise ValueError(f"tenant traces have different hash-id block sizes {sorted(block_sizes)}")
    id_offset = 0
    for workload, slo_class in tenants:
        if not slo_class:
            raise ValueError(f"tenant trace {workload.name!r} has an empty SLO class")
        t0 = workload[0].arrival_s if len(workload) else 0.0
        records.extend(
            replace(
                r,
                arrival_s=r.arrival_s - t0,
                slo_class=slo_class,
                hash_ids=tuple(h + id_offset for h in r.hash_ids),
            )
            for r in workload
        )
        id_offset += max((max(r.hash_ids) + 1 for r in workload if r.hash_ids), default=0)
    name = "+".join(f"{w.name}={c}" for w, c in tenants)
    # Stable sort: requests arriving at the same instant keep the tenants' order.
    records.sort(key=lambda r: r.arrival_s)
    skipped = sum(w.skipped_rows for w, _ in tenants)
    return Workload(name, tuple(records), skipped, next(iter(block_sizes), None))
