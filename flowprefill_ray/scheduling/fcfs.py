"""First come, first served, run to completion (DistServe-style disaggregated prefill)."""

from __future__ import annotations

from .records import RequestRecord
from .run_to_completion import RunToCompletionPolicy


class FCFSPolicy(RunToCompletionPolicy):
    name = "fcfs"

    @staticmethod
    def _queue_key(rec: RequestRecord) -> float:
        # Arrival time, so a request re-queued after a worker loss keeps its place.
        return rec.arrival_s
