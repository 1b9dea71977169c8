"""What a policy shows of itself: one request's state, counters for logs and metrics.

Read-only views over the state ``Policy`` (policy.py) keeps, plus ``forget``, which drops a
finished request's record so that a long-running service keeps bounded memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import RequestView, WorkerState
from .request import RequestStatus

if TYPE_CHECKING:
    from .kv_memory import KVMemory
    from .predictor import TTFTPredictor
    from .records import RequestRecord, WorkerRecord
    from .waiting_work import WaitingWork


class PolicyViews:
    """Mixed into ``Policy`` (policy.py), whose state it reads."""

    # Provided by Policy (with ``decisions``).
    name: str
    memory: KVMemory
    predictor: TTFTPredictor
    requests: dict[str, RequestRecord]
    workers: dict[str, WorkerRecord]
    waiting: int
    waiting_work: WaitingWork | None
    counters: dict[str, int]
    blocking_s_total: float

    def request_view(self, request_id: str) -> RequestView:
        """Snapshot of one request; raises ``KeyError`` naming an unknown request."""
        rec = self.requests.get(request_id)
        if rec is None:
            raise KeyError(f"policy {self.name!r} has no request {request_id!r}")
        return RequestView(
            request_id=rec.request_id,
            status=rec.status,
            deadline_s=rec.deadline_s,
            executed_s=rec.executed_s,
            prefilled_tokens=rec.prefilled_tokens,
            worker_id=rec.worker_id,
            unit_id=rec.unit_id,
            slo_class=rec.slo_class,
            ttft_slo_s=rec.ttft_slo_s,
        )

    def paused_tokens(self, w: WorkerRecord) -> int:
        """Prompt tokens held in ``w``'s paused units and in its pausing unit, if any."""
        held = sum(u.tokens for u in w.paused.values())
        if w.state is WorkerState.PAUSING and w.running is not None:
            held += w.running.tokens
        return held

    def forget(self, request_id: str) -> None:
        """Drop a terminal request's record (long-running services call this to bound memory).

        Raises ``ValueError`` if the request is still live."""
        rec = self.requests.get(request_id)
        if rec is None:
            return
        if not rec.status.is_terminal:
            raise ValueError(f"request {request_id!r} is {rec.status.value}, not finished")
        del self.requests[request_id]

    def stats(self) -> dict[str, Any]:
        """Counters, request counts per status and worker states, for logs and metrics."""
        by_status = dict.fromkeys((s.value for s in RequestStatus), 0)
        for rec in self.requests.values():
            by_status[rec.status.value] += 1
        return {
            "policy": self.name,
            **self.counters,
            "decision_events": self.decisions.events,
            "decisions": self.decisions.decisions,
            "blocking_s_total": self.blocking_s_total,
            "requests": by_status,
            "workers": {wid: w.state.value for wid, w in self.workers.items()},
            "paused_units": sum(len(w.paused) for w in self.workers.values()),
            "paused_tokens": {wid: self.paused_tokens(w) for wid, w in self.workers.items()},
            # Per budgeted worker: its KV budgets and the bytes the policy counts it holding.
            "kv_memory": self.memory.stats(self.workers.values(), self.requests),
            "waiting": self.waiting,
            # Waiting requests the queue estimate gave up protecting (admission.py).
            "admission_unprotected": (
                self.waiting_work.unprotected if self.waiting_work is not None else 0
            ),
            "predictor_correction": self.predictor.correction,
        }
