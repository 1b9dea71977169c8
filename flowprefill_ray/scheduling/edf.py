"""Earliest deadline first, run to completion: deadline-aware ordering without preemption."""

from __future__ import annotations

from .records import RequestRecord
from .run_to_completion import RunToCompletionPolicy


class EDFPolicy(RunToCompletionPolicy):
    name = "edf"

    @staticmethod
    def _queue_key(rec: RequestRecord) -> float:
        return rec.deadline_s
