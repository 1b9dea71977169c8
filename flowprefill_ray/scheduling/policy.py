"""The policy base class: event bookkeeping shared by every scheduling policy.

A policy hears events (``events.py``) stamped with ``now`` (seconds) and answers with
decisions. The base class keeps the state every policy needs - requests, workers, running and
paused units - and applies the consequences of each event (a completed unit finishes its
requests, a lost worker re-queues its requests, ...). A subclass only says how waiting work
is queued (``_enqueue``) and what to do next (``_schedule``), using the ``_start_unit``,
``_preempt``, ``_resume``, ``_discard`` and ``_evict`` helpers so that the bookkeeping stays in
one place. Admission control (``admission.py``) runs here, on every ``Arrival``, for every
policy; every request that becomes WAITING goes through ``_queue`` so that the waiting count
(and, for the ``queue`` estimate, the waiting-work index) stays exact. With
``late_give_up_factor`` set, requests that have waited that far past their deadline are refused
before each scheduling round (``give_up.py``).

Two read-only parts live in their own modules and are mixed in: ``work_estimates.py`` (a
unit's remaining work and slack, the admission estimate's work ahead and spare room) and
``policy_views.py`` (a request's view, ``stats``, ``forget``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .admission import AdmissionControl, Overtake
from .config import PolicyConfig
from .events import (
    Arrival,
    Cancelled,
    Decision,
    Downgrade,
    Event,
    Reject,
    UnitCompleted,
    UnitPaused,
    WorkerJoined,
    WorkerLeft,
)
from .give_up import GiveUp
from .handover import Handover
from .kv_memory import KVMemory
from .overtaking import Overtaking
from .policy_views import PolicyViews
from .predictor import TTFTPredictor
from .prefix_routing import PrefixRouting
from .records import (
    RequestRecord,
    UnitRecord,
    UnitState,
    WorkerRecord,
    WorkerState,
)
from .request import RequestStatus
from .slo import DEFAULT_SLO_CONFIG, SLOConfig
from .unit_decisions import UnitDecisions
from .waiting_work import WaitingWork
from .work_estimates import WorkEstimates

_WAITING = RequestStatus.WAITING
_RUNNING = RequestStatus.RUNNING
_PAUSED = RequestStatus.PAUSED
_FINISHED = RequestStatus.FINISHED
_CANCELLED = RequestStatus.CANCELLED
_REJECTED = RequestStatus.REJECTED


class DuplicateArrivalError(ValueError):
    """An Arrival reused a request_id the policy already knows: the driver broke the event
    contract. (A client reusing an id in flight is the runtime's ``DuplicateRequestError``, an
    HTTP 400 the scheduler raises before the policy hears of the request.)"""


@dataclass(slots=True)
class DecisionCounts:
    events: int = 0  # on_event calls that produced at least one decision
    decisions: int = 0  # decisions produced in all


class Policy(
    WorkEstimates, PolicyViews, PrefixRouting, Handover, UnitDecisions, GiveUp, Overtaking, ABC
):
    """Base of all policies. Decisions happen only in ``on_event``."""

    name: ClassVar[str]
    # Whether a waiting request can take a worker from a running unit that ranks below it
    # (then only running units that rank before a newcomer delay it).
    preemptive: ClassVar[bool] = False

    def __init__(
        self,
        config: PolicyConfig,
        predictor: TTFTPredictor,
        slo: SLOConfig | None = None,
    ) -> None:
        self.config = config
        self.predictor = predictor
        self.memory = KVMemory(config.long_chunk_tokens)  # KV budgets from WorkerJoined
        self.slo = slo or DEFAULT_SLO_CONFIG
        self.admission = AdmissionControl(config.admission, predictor, self.slo)
        # Only the `queue` estimate needs the index; the count is kept for max_waiting.
        self.waiting_work: WaitingWork | None = (
            WaitingWork(predictor, config.admission.headroom)
            if self.admission.uses_queue_estimate
            else None
        )
        self.waiting = 0  # requests WAITING (queued, admitted, not started)
        self._loads: list[tuple[float, bool, bool, float]] = []  # see _unit_loads
        self._loads_key: tuple[int, float] | None = None
        self.requests: dict[str, RequestRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.units: dict[int, UnitRecord] = {}  # running, pausing and paused units
        self.decisions = DecisionCounts()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "events",
                "arrivals",
                "units_started",
                "preemptions",
                "resumes",
                "discards",  # every Discard: cancelled paused units and evictions
                "rejects",  # every Reject
                "rejects_queue_full",  # of which: admission.max_waiting reached
                "downgrades",
                "evictions",  # paused units discarded to stay within a worker's KV budget
                "evicted_requests",  # live requests in them, re-queued from token 0
                "requeued",  # requests re-queued because their worker left
                "over_budget_units",  # units started beyond their worker's KV budget
                "stale_events",
                # a queued unit's report came before its victim's (handover.py): how often
                # the runtime's answers cross
                "queued_reported_first",
            ),
            0,
        )
        self.blocking_s_total = 0.0  # sum of UnitPaused.blocking_s
        self._init_prefix(config.prefix)
        self._init_give_up(config.late_give_up_factor)
        self._init_overtaking()
        self._next_unit_id = 1
        self._next_order = 0
        self._next_token = 1
        self._handlers: dict[type, Callable[[Any, float, list[Decision]], None]] = {
            Arrival: self._on_arrival,
            UnitCompleted: self._on_unit_completed,
            UnitPaused: self._on_unit_paused,
            WorkerJoined: self._on_worker_joined,
            WorkerLeft: self._on_worker_left,
            Cancelled: self._on_cancelled,
        }

    # ------------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _enqueue(self, rec: RequestRecord, now: float) -> None:
        """Put a WAITING request (new or re-queued) into the policy's queue."""

    @abstractmethod
    def _schedule(self, now: float) -> list[Decision]:
        """Decide what runs after the state has absorbed an event."""

    # ------------------------------------------------------------------ entry point

    def on_event(self, event: Event, now: float) -> list[Decision]:
        """Absorb ``event`` (at time ``now``, seconds) and return the decisions it triggers."""
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"{type(event).__name__} is not a scheduling event")
        self.counters["events"] += 1
        out: list[Decision] = []
        handler(event, now, out)
        self._give_up_overdue(now, out)
        out.extend(self._schedule(now))
        if out:
            self.decisions.events += 1
            self.decisions.decisions += len(out)
        return out

    # ------------------------------------------------------------------ event bookkeeping

    def _on_arrival(self, event: Arrival, now: float, out: list[Decision]) -> None:
        request = event.request
        rid = request.request_id
        if rid in self.requests:
            raise DuplicateArrivalError(f"request_id {rid!r} arrived twice")
        ttft_slo = request.ttft_target_s
        rec = RequestRecord(
            request=request,
            request_id=rid,
            arrival_s=request.arrival_s,
            deadline_s=request.arrival_s + ttft_slo,
            ttft_slo_s=ttft_slo,
            slo_class=request.slo_class,
            prompt_tokens=request.prompt_tokens,
            tiebreak=(-request.priority, self._next_order),
        )
        self._next_order += 1
        self.requests[rid] = rec
        self._prefix_arrived(rec)
        self.counters["arrivals"] += 1
        verdict = self.admission.decide(rec, now, self.waiting, self._saturated(), self)
        victims: list[RequestRecord] = []
        if isinstance(verdict, Overtake):
            victims = self._to_overtake(rec, verdict.work_s)
            capped = self._overtake_capped(rec, victims)
            if capped is not None:
                verdict = Reject(rid, capped, self.admission.config.retry_after_s)
        if isinstance(verdict, Reject):
            rec.status = _REJECTED
            self.counters["rejects"] += 1
            if self.admission.queue_full(self.waiting):
                self.counters["rejects_queue_full"] += 1
            out.append(verdict)
            return
        if isinstance(verdict, Downgrade):
            rec.slo_class = verdict.slo_class
            rec.ttft_slo_s = verdict.ttft_slo_s
            rec.deadline_s = rec.arrival_s + verdict.ttft_slo_s
            self.counters["downgrades"] += 1
            out.append(verdict)
        self._watch_give_up(rec)
        self._queue(rec, now)
        if victims:
            self._overtake(rec, victims, now, out)

    def _on_unit_completed(self, event: UnitCompleted, now: float, out: list[Decision]) -> None:
        u = self.units.get(event.unit_id)
        if u is None or u.worker_id != event.worker_id:
            self.counters["stale_events"] += 1
            return
        del self.units[u.unit_id]
        w = self.workers[u.worker_id]
        self._running_ended(w, u, now)
        w.paused.pop(u.unit_id, None)
        items = u.unit.items
        if self.config.online_correction and self.config.learn_unit_overhead:
            # This run's wall time on the policy's clock beyond the worker's compute in it
            # (``u.executed_s``: the compute of its earlier runs, from UnitPaused).
            run_compute_s = event.executed_s - u.executed_s
            self.predictor.observe_unit_overhead(now - u.started_at_s - run_compute_s)
        self.admission.unit_completed(items, self.requests, event.executed_s, now)
        if self.config.online_correction and all(item.start == 0 for item in items):
            # Chunks that attend an earlier prefix cost more than their token count says.
            self.predictor.observe(u.tokens, event.executed_s)
        for item in items:
            rec = self.requests[item.request_id]
            rec.executed_s += event.executed_s * item.tokens / u.tokens
            rec.prefilled_tokens = item.end
            rec.unit_id = None
            if rec.status is _CANCELLED:
                w.partial.discard(rec.request_id)
                rec.worker_id = None
            elif item.end >= rec.prompt_tokens:
                rec.status = _FINISHED
                self._prefix_finished(w.worker_id, rec)
                rec.worker_id = None
                w.partial.discard(rec.request_id)
            else:
                rec.status = _PAUSED  # its KV so far waits on this worker for the next chunk
                rec.worker_id = w.worker_id
                w.partial.add(rec.request_id)

    def _on_unit_paused(self, event: UnitPaused, now: float, out: list[Decision]) -> None:
        u = self.units.get(event.unit_id)
        if u is None or u.worker_id != event.worker_id or u.state is UnitState.PAUSED:
            self.counters["stale_events"] += 1
            return
        w = self.workers[u.worker_id]
        u.state = UnitState.PAUSED
        u.executed_s = event.executed_s
        self.blocking_s_total += event.blocking_s
        self._running_ended(w, u, now)
        w.paused[u.unit_id] = u
        live = False
        for item in u.unit.items:
            rec = self.requests[item.request_id]
            if rec.status is _RUNNING:
                rec.status = _PAUSED
                live = True
        if not live:  # everything in it was cancelled while it ran
            out.append(self._discard(u))

    def _on_worker_joined(self, event: WorkerJoined, now: float, out: list[Decision]) -> None:
        if event.worker_id in self.workers:
            self.counters["stale_events"] += 1
            return
        self.workers[event.worker_id] = WorkerRecord(event.worker_id)
        self._prefix_worker_joined(event.worker_id)
        self.memory.join(event.worker_id, event.kv_budget)

    def _on_worker_left(self, event: WorkerLeft, now: float, out: list[Decision]) -> None:
        w = self.workers.pop(event.worker_id, None)
        if w is None:
            self.counters["stale_events"] += 1
            return
        self._prefix_worker_left(event.worker_id)
        self.memory.leave(event.worker_id)
        lost = list(w.paused.values())
        lost.extend(u for u in (w.running, w.next) if u is not None)
        rids: list[str] = [item.request_id for u in lost for item in u.unit.items]
        rids.extend(w.partial)
        for u in lost:
            self.units.pop(u.unit_id, None)
        for rid in rids:
            rec = self.requests[rid]
            if rec.status is _RUNNING or rec.status is _PAUSED:
                # Its KV and activations died with the worker: start over, same deadline.
                rec.status = _WAITING
                rec.prefilled_tokens = 0
                rec.executed_s = 0.0
                rec.worker_id = None
                rec.unit_id = None
                self.counters["requeued"] += 1
                self._queue(rec, now)

    def _on_cancelled(self, event: Cancelled, now: float, out: list[Decision]) -> None:
        rec = self.requests.get(event.request_id)
        if rec is None or rec.status.is_terminal:
            self.counters["stale_events"] += 1
            return
        previous = rec.status
        self._end_unserved(rec, _CANCELLED)
        if previous is _PAUSED:
            if rec.unit_id is not None:
                u = self.units[rec.unit_id]
                if all(self.requests[i.request_id].status.is_terminal for i in u.unit.items):
                    out.append(self._discard(u))
            elif rec.worker_id is not None and rec.worker_id in self.workers:
                # A chunked request between chunks: the runtime frees its KV on the cancel.
                self.workers[rec.worker_id].partial.discard(rec.request_id)
            rec.worker_id = None
        # A RUNNING request's unit runs on; its completion will not mark it finished.

    # ------------------------------------------------------------------ waiting requests

    def _queue(self, rec: RequestRecord, now: float) -> None:
        """Make ``rec`` WAITING and queue it (a new, re-queued or evicted request)."""
        rec.status = _WAITING
        self.waiting += 1
        if self.waiting_work is not None:
            self.waiting_work.add(rec, now)
        if self.tier_work:
            self._tiers_add(rec, now)
        self._enqueue(rec, now)

    def _end_unserved(self, rec: RequestRecord, status: RequestStatus) -> None:
        """``rec`` ends with ``status`` (cancelled or refused) before its first token: it
        leaves the waiting count if it was waiting, and any queue entry goes stale."""
        if rec.status is _WAITING:
            self._left_waiting(rec)
        rec.status = status
        rec.queue_token = 0

    def _refuse_admitted(self, rec: RequestRecord, reason: str, out: list[Decision]) -> None:
        """Refuse ``rec`` after it was admitted (given up late, or overtaken): HTTP 429 with
        ``reason`` and the admission config's Retry-After."""
        self._end_unserved(rec, _REJECTED)
        rec.worker_id = None
        self.counters["rejects"] += 1
        out.append(Reject(rec.request_id, reason, self.admission.config.retry_after_s))

    def _left_waiting(self, rec: RequestRecord) -> None:
        """``rec`` stops WAITING (it starts or is cancelled); its queue entry goes stale."""
        self.waiting -= 1
        if self.waiting_work is not None:
            self.waiting_work.remove(rec.request_id)
        if self.tier_work:
            self._tiers_remove(rec.request_id)

    def _saturated(self) -> bool:
        """No worker is idle (with no workers at all, nothing can run either)."""
        return all(w.state is not WorkerState.IDLE for w in self.workers.values())

    def _new_token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token
