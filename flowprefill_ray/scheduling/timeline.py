"""The scheduler timeline: what happened to each request, event by event.

Whoever drives a policy (the simulator, the Ray scheduler actor) calls
``timeline.record(event, now, decisions)`` right after ``decisions = policy.on_event(event,
now)``. From events and decisions alone the timeline rebuilds, per request, its arrival, SLO
class and deadline, predicted prefill, the units it joined and, per unit, its worker, members,
predicted and actual compute, every run span, every pause (when the preempt was decided, when
the worker stopped, who took the worker, when it resumed) and how the unit ended. That is what
``why_late.py`` needs to say why a request missed its TTFT target, and what the Gantt chart
(``flowprefill_ray.timeline_plot``) draws.

Memory is bounded: live requests (and the units they are in) plus a ring of the last
``capacity`` terminal requests; a finished unit lives as long as a kept request refers to it.
Work per event is O(decisions x unit members): no scan over all requests.

Plain Python (no Ray, no torch), like the rest of ``scheduling``.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .events import (
    Arrival,
    Cancelled,
    Decision,
    Discard,
    Downgrade,
    Event,
    Overtaken,
    Preempt,
    Reject,
    Resume,
    RunUnit,
    UnitCompleted,
    UnitPaused,
    WorkerJoined,
    WorkerLeft,
)
from .timeline_records import PauseTrace, RequestTrace, UnitTrace, request_dict, unit_dict

FORMAT = "flowprefill-timeline"
VERSION = 1


# (worker, unit paused, its pause) when an event's UnitPaused freed a worker
_Freed = tuple[str, int, PauseTrace]


class Timeline:
    """Records a policy's events and decisions; see the module docstring.

    ``predict(tokens) -> seconds`` is the policy's predictor (``policy.predictor.predict``:
    ``Timeline.for_policy`` takes it from there), read when a request arrives and when a unit
    starts, so the recorded predictions are the ones the policy decided with.
    """

    def __init__(self, predict: Callable[[int], float], capacity: int = 2000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.predict = predict
        self.capacity = capacity
        self.now_s = 0.0
        self.workers: dict[str, None] = {}  # ordered set, in joining order
        self._live: dict[str, RequestTrace] = {}
        self._done: OrderedDict[str, RequestTrace] = OrderedDict()  # the ring, oldest first
        self._units: dict[int, UnitTrace] = {}  # running and paused units
        self._partial: dict[str, set[str]] = {}  # worker -> requests whose KV waits there
        self._stopping: dict[str, UnitTrace] = {}  # worker -> its unit told to pause
        # One-hop handover: worker -> the unit sent with the preemption, begun at the stop.
        self._queued: dict[str, UnitTrace] = {}
        self._seq = 0

    @classmethod
    def for_policy(cls, policy: Any, capacity: int = 2000) -> Timeline:
        return cls(policy.predictor.predict, capacity)

    # ------------------------------------------------------------------ recording

    def record(self, event: Event, now: float, decisions: list[Decision]) -> None:
        """Absorb one ``policy.on_event(event, now)`` call and the decisions it returned."""
        self.now_s = now
        paused: _Freed | None = None
        if isinstance(event, Arrival):
            self._arrival(event, now)
        elif isinstance(event, UnitCompleted):
            self._completed(event, now)
            self._hand_over(event.worker_id, event.unit_id, now, None)
        elif isinstance(event, UnitPaused):
            paused = self._paused(event, now)
            self._hand_over(event.worker_id, event.unit_id, now, paused)
        elif isinstance(event, Cancelled):
            rec = self._live.get(event.request_id)
            if rec is not None:
                self._partial.get(rec.worker_id or "", set()).discard(rec.request_id)
                self._close(rec, "cancelled", now)
        elif isinstance(event, WorkerJoined):
            self.workers[event.worker_id] = None
        elif isinstance(event, WorkerLeft):
            self._worker_left(event.worker_id, now)
        for d in decisions:
            if isinstance(d, RunUnit):
                self._run(d, now, paused)
            elif isinstance(d, Resume):
                self._resume(d, now, paused)
            elif isinstance(d, Preempt):
                u = self._units.get(d.unit_id)
                if u is not None:
                    u.pending_preempt_s = now
                    self._stopping[u.worker_id] = u
                    if isinstance(event, Arrival):  # asked for the newcomer (see why_late)
                        rec = self._live.get(event.request.request_id)
                        if rec is not None and rec.preempt_asked is None:
                            rec.preempt_asked = (u, now)
            elif isinstance(d, Discard):
                self._discard(d, now)
            elif isinstance(d, Reject):
                rec = self._live.get(d.request_id)
                if rec is not None:
                    rec.reason = d.reason
                    self._close(rec, "rejected", now)
            elif isinstance(d, Downgrade):
                rec = self._live.get(d.request_id)
                if rec is not None:
                    rec.slo_class, rec.ttft_slo_s = d.slo_class, d.ttft_slo_s
            elif isinstance(d, Overtaken):
                rec = self._live.get(d.request_id)
                if rec is not None:
                    rec.overtaken.append((now, d.by_request_id))

    def note_failed(self, request_id: str, now: float) -> None:
        """The request failed (its own prefill raised on the worker): it ends here, apart from
        cancelled ones. Call before the policy hears of it as a cancellation."""
        rec = self._live.get(request_id)
        if rec is not None:
            self._partial.get(rec.worker_id or "", set()).discard(rec.request_id)
            self._close(rec, "failed", now)

    def note_client_ttft(self, request_id: str, ttft_s: float) -> bool:
        """The TTFT the client saw (seconds from the same arrival), measured on the serving
        path; ``why_late`` tells serving overhead from scheduler time with it. False when the
        request is no longer kept."""
        rec = self._live.get(request_id) or self._done.get(request_id)
        if rec is None:
            return False
        rec.client_ttft_s = ttft_s
        return True

    def _arrival(self, event: Arrival, now: float) -> None:
        req = event.request
        target = req.ttft_target_s
        self._seq += 1
        self._live[req.request_id] = RequestTrace(
            seq=self._seq,
            request_id=req.request_id,
            slo_class=req.slo_class,
            original_class=req.slo_class,
            arrival_s=req.arrival_s,
            ttft_slo_s=target,
            original_ttft_slo_s=target,
            prompt_tokens=req.prompt_tokens,
            predicted_s=self.predict(req.prompt_tokens),
        )

    def _run(self, d: RunUnit, now: float, paused: _Freed | None) -> None:
        unit = d.unit
        members = tuple((i.request_id, i.start, i.end) for i in unit.items)
        u = UnitTrace(
            unit.unit_id, unit.worker_id, members, unit.tokens, self.predict(unit.tokens), now
        )
        self._units[u.unit_id] = u
        self.workers.setdefault(u.worker_id, None)
        stopping = self._stopping.get(u.worker_id)
        if stopping is not None and stopping.outcome == "running":
            self._queued[u.worker_id] = u  # begins when the stopping unit stops
        else:
            self._begin(u, now, paused)
        for rid, start, end in members:
            rec = self._live.get(rid)
            if rec is None:
                continue
            if rec.status == "partial":
                self._partial.get(rec.worker_id or "", set()).discard(rid)
            rest = self.predict(rec.prompt_tokens - end) if end < rec.prompt_tokens else 0.0
            rec.stages.append((u, start, end, rest))
            rec.status, rec.worker_id = "running", u.worker_id

    def _begin(self, u: UnitTrace, now: float, paused: _Freed | None) -> None:
        if not u.runs:
            u.started_s = now  # a handed-over unit starts at the stop, not when decided
        u.runs.append([now, None])
        self._took_worker(u, paused)
        for rid, _, _ in u.members:
            rec = self._live.get(rid)
            if rec is not None and rec.first_start_s is None:
                rec.first_start_s = now

    def _hand_over(self, worker_id: str, unit_id: int, now: float, paused: _Freed | None) -> None:
        """The worker's stopping unit stopped: the unit queued behind it begins."""
        stopping = self._stopping.get(worker_id)
        if stopping is None or stopping.unit_id != unit_id:
            return
        del self._stopping[worker_id]
        queued = self._queued.pop(worker_id, None)
        if queued is not None and self._units.get(queued.unit_id) is queued:
            self._begin(queued, now, paused)

    def _resume(self, d: Resume, now: float, paused: _Freed | None) -> None:
        u = self._units.get(d.unit_id)
        if u is None:
            return
        if u.pauses and u.pauses[-1].resumed_s is None:
            u.pauses[-1].resumed_s = now
        u.runs.append([now, None])
        u.outcome = "running"
        self._took_worker(u, paused)
        self._set_status(u, "paused", "running")

    @staticmethod
    def _took_worker(u: UnitTrace, paused: _Freed | None) -> None:
        # The unit started on the worker this very event's UnitPaused freed: it is the one the
        # preemption was for (or the best one when the worker came free).
        if paused is None:
            return
        worker_id, victim, pause = paused
        if worker_id == u.worker_id and pause.by_unit is None:
            pause.by_unit = u.unit_id
            u.took_over = (victim, pause.preempt_s)

    def _paused(self, event: UnitPaused, now: float) -> _Freed | None:
        u = self._units.get(event.unit_id)
        if u is None or u.outcome != "running":
            return None
        self._end_run(u, now)
        pause = PauseTrace(u.pending_preempt_s, now, event.executed_s, event.blocking_s)
        u.pauses.append(pause)
        u.pending_preempt_s = None
        u.outcome = "paused"
        self._set_status(u, "running", "paused")
        return u.worker_id, u.unit_id, pause

    def _completed(self, event: UnitCompleted, now: float) -> None:
        u = self._units.pop(event.unit_id, None)
        if u is None or u.worker_id != event.worker_id:
            if u is not None:
                self._units[u.unit_id] = u  # a stale report from another worker
            return
        self._end_run(u, now)
        u.ended_s, u.actual_s, u.outcome = now, event.executed_s, "completed"
        u.pending_preempt_s = None
        for rid, _, end in u.members:
            rec = self._live.get(rid)
            if rec is None or rec.status not in ("running", "paused"):
                continue
            if end >= rec.prompt_tokens:
                rec.first_token_s = now
                self._close(rec, "finished", now)
            else:  # a chunk: its KV waits on this worker for the next one
                rec.status = "partial"
                self._partial.setdefault(u.worker_id, set()).add(rid)

    def _discard(self, d: Discard, now: float) -> None:
        u = self._units.pop(d.unit_id, None)
        if u is not None:
            self._lose(u, now, "discarded", "evicted")

    def _worker_left(self, worker_id: str, now: float) -> None:
        for u in [u for u in self._units.values() if u.worker_id == worker_id]:  # a handful
            del self._units[u.unit_id]
            self._lose(u, now, "lost", "worker_left")
        for rid in self._partial.pop(worker_id, set()):
            rec = self._live.get(rid)
            if rec is not None and rec.status == "partial":
                self._requeue(rec, now, "worker_left")

    def _lose(self, u: UnitTrace, now: float, outcome: str, why: str) -> None:
        """``u`` ended without completing: its live requests start over (policy.py does the
        same: same deadline, progress reset)."""
        self._end_run(u, now)  # a last pause left open is closed by ended_s
        u.ended_s, u.outcome = now, outcome
        for rid, _, _ in u.members:
            rec = self._live.get(rid)
            if rec is not None and rec.status in ("running", "paused"):
                self._requeue(rec, now, why)

    @staticmethod
    def _requeue(rec: RequestTrace, now: float, why: str) -> None:
        rec.status, rec.worker_id = "waiting", None
        rec.requeues.append((now, why))

    @staticmethod
    def _end_run(u: UnitTrace, now: float) -> None:
        if u.runs and u.runs[-1][1] is None:
            u.runs[-1][1] = now

    def _set_status(self, u: UnitTrace, old: str, new: str) -> None:
        for rid, _, _ in u.members:
            rec = self._live.get(rid)
            if rec is not None and rec.status == old:
                rec.status = new

    def _close(self, rec: RequestTrace, status: str, now: float) -> None:
        rec.status, rec.closed_s = status, now
        del self._live[rec.request_id]
        self._done.pop(rec.request_id, None)  # an id reused later goes to the ring's end
        self._done[rec.request_id] = rec
        if len(self._done) > self.capacity:
            self._done.popitem(last=False)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        """Requests kept: live ones plus the ring of terminal ones."""
        return len(self._live) + len(self._done)

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def export(self, last: int | None = 200) -> dict[str, Any]:
        """The ``last`` most recently arrived requests kept (all kept when None), with every
        unit they joined: JSON-able (no prompt text, only token counts); see docs/SCHEDULING.md
        for the fields. ``why_late.why_late`` and ``timeline_plot.draw_gantt`` read it."""
        n = len(self) if last is None else max(last, 0)
        kept = itertools.chain(self._live.values(), self._done.values())
        picked = sorted(heapq.nlargest(n, kept, key=_arrival_order), key=_arrival_order)
        units: dict[int, UnitTrace] = {}
        for rec in picked:
            for u, _, _, _ in rec.stages:
                units[u.unit_id] = u
            if rec.preempt_asked is not None:
                units[rec.preempt_asked[0].unit_id] = rec.preempt_asked[0]
        return {
            "format": FORMAT,
            "version": VERSION,
            "now_s": self.now_s,
            "workers": list(self.workers),
            "requests": [request_dict(r) for r in picked],
            "units": [unit_dict(u) for u in sorted(units.values(), key=lambda u: u.unit_id)],
        }

    def save(self, path: str | Path, last: int | None = None) -> Path:
        """Write ``export(last)`` as JSON (the ``flowprefill timeline`` command reads it)."""
        path = Path(path)
        path.write_text(json.dumps(self.export(last), indent=1))
        return path


def _arrival_order(rec: RequestTrace) -> int:
    return rec.seq
