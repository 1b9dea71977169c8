"""What the policy does to units: start one, pause, resume, discard or evict it.

Each helper updates the policy's records (requests, units, workers, counters) and returns the
decision that tells the driver to act; ``Policy`` (policy.py) decides when to call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .events import Discard, Preempt, Resume, RunUnit, WorkItem, WorkUnit
from .records import RequestRecord, UnitRecord, UnitState, WorkerRecord, WorkerState
from .request import RequestStatus

if TYPE_CHECKING:
    from .kv_memory import UnitRoom

_WAITING = RequestStatus.WAITING
_RUNNING = RequestStatus.RUNNING
_PAUSED = RequestStatus.PAUSED


class UnitDecisions:
    """Mixed into ``Policy`` (policy.py), whose records these read and write."""

    def _start_unit(
        self, w: WorkerRecord, items: list[WorkItem], now: float, room: UnitRoom | None = None
    ) -> RunUnit:
        """Start ``items`` as a new unit on idle worker ``w``."""
        u = self._new_unit(w, items, now, room)
        w.running = u
        w.state = WorkerState.RUNNING
        return RunUnit(u.unit)

    def _new_unit(
        self, w: WorkerRecord, items: list[WorkItem], now: float, room: UnitRoom | None = None
    ) -> UnitRecord:
        """The records of a new unit of ``items`` (``room``: their share of ``w``'s KV budget).
        A whole prompt starts where ``w``'s prefix cache ends (``prefix_routing.py``), but is
        priced from ``item.start`` as decided: a cache hit is a copy the unit holds too."""
        if room is not None and room.over_budget:
            self.counters["over_budget_units"] += 1
        kv_bytes = self.memory.items_bytes(w.worker_id, items)
        for i, item in enumerate(items):
            rec = self.requests[item.request_id]
            start = self._prefix_start(w.worker_id, rec, item.start, item.end)
            if start != item.start:
                items[i] = WorkItem(item.request_id, start, item.end)
        unit = WorkUnit(self._next_unit_id, w.worker_id, tuple(items))
        self._next_unit_id += 1
        head = None
        for item in items:
            rec = self.requests[item.request_id]
            rec.cache_wait_until_s = float("-inf")
            if rec.status is _WAITING:
                self._left_waiting(rec)
            rec.status = _RUNNING
            rec.worker_id = w.worker_id
            rec.unit_id = unit.unit_id
            rec.queue_token = 0
            if head is None or (rec.deadline_s, rec.tiebreak) < (head.deadline_s, head.tiebreak):
                head = rec
        assert head is not None, "a unit needs at least one item"
        u = UnitRecord(
            unit=unit,
            tokens=unit.tokens,
            deadlines=tuple(sorted(self.requests[i.request_id].deadline_s for i in items)),
            ttft_slo_s=head.ttft_slo_s,
            tiebreak=head.tiebreak,
            started_at_s=now,
            kv_bytes=kv_bytes,
        )
        self.units[unit.unit_id] = u
        self.counters["units_started"] += 1
        return u

    def _preempt(self, w: WorkerRecord) -> Preempt:
        """Ask ``w`` to pause its running unit; ``w`` is PAUSING until it answers."""
        u = w.running
        assert u is not None and w.state is WorkerState.RUNNING
        u.state = UnitState.PAUSING
        w.state = WorkerState.PAUSING
        self.counters["preemptions"] += 1
        return Preempt(w.worker_id, u.unit_id)

    def _resume(self, u: UnitRecord, now: float) -> Resume:
        """Continue paused unit ``u`` on its (idle) worker."""
        w = self.workers[u.worker_id]
        assert w.state is WorkerState.IDLE and u.state is UnitState.PAUSED
        del w.paused[u.unit_id]
        u.state = UnitState.RUNNING
        u.started_at_s = now
        w.running = u
        w.state = WorkerState.RUNNING
        for item in u.unit.items:
            rec = self.requests[item.request_id]
            if rec.status is _PAUSED:
                rec.status = _RUNNING
        self.counters["resumes"] += 1
        return Resume(w.worker_id, u.unit_id)

    def _discard(self, u: UnitRecord) -> Discard:
        """Drop paused unit ``u`` (its requests are terminal, or ``_evict`` re-queues them)."""
        self.units.pop(u.unit_id, None)
        w = self.workers.get(u.worker_id)
        if w is not None:
            w.paused.pop(u.unit_id, None)
        self.counters["discards"] += 1
        return Discard(u.worker_id, u.unit_id, u.unit.request_ids)

    def _evict(self, u: UnitRecord) -> tuple[Discard, list[RequestRecord]]:
        """Drop paused unit ``u`` to free memory. Its live requests lose their progress
        (recomputed from token 0 later, same deadlines) and are returned for the caller to
        ``_queue``; cancelled ones are simply gone."""
        assert u.state is UnitState.PAUSED
        requeue: list[RequestRecord] = []
        for item in u.unit.items:
            rec = self.requests[item.request_id]
            if rec.status is _PAUSED:
                rec.prefilled_tokens = 0
                rec.executed_s = 0.0
                rec.worker_id = None
                rec.unit_id = None
                requeue.append(rec)
        self.counters["evictions"] += 1
        self.counters["evicted_requests"] += len(requeue)
        return self._discard(u), requeue
