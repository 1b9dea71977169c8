"""Several tenants' traffic as one trace: each tenant a trace of its own and one SLO class.

A shared deployment serves tenants with different latency promises at once, e.g. a chat
product (short prompts, tight TTFT) next to a coding assistant (long prompts, loose TTFT).
``merge_tenants`` interleaves their traces by arrival time, each request labelled with its
tenant's class, so one replay offers both loads together as they would meet in production.
Each trace keeps its own arrival pattern (both start at 0): the merged rate is the sum.
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
    for workload, slo_class in tenants:
        if not slo_class:
            raise ValueError(f"tenant trace {workload.name!r} has an empty SLO class")
        t0 = workload[0].arrival_s if len(workload) else 0.0
        records.extend(
            replace(r, arrival_s=r.arrival_s - t0, slo_class=slo_class) for r in workload
        )
    name = "+".join(f"{w.name}={c}" for w, c in tenants)
    # Stable sort: requests arriving at the same instant keep the tenants' order.
    records.sort(key=lambda r: r.arrival_s)
    return Workload(name, tuple(records), sum(w.skipped_rows for w, _ in tenants))
