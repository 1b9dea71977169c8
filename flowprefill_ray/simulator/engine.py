"""The discrete-event simulator: drives a scheduling ``Policy`` over simulated prefill workers.

Time advances from event to event (a heap ordered by time): request arrivals, unit
completions and unit pauses. The policy hears exactly the events of
``flowprefill_ray.scheduling.events`` and its decisions take effect at once (scheduling is
instantaneous in simulated time), except ``Preempt``, which is asynchronous as on a real
worker: the unit runs on to its next checkpoint at the configured granularity and only then
reports ``UnitPaused``. Because the cost model splits a unit into blocks, the simulator knows
where the unit is and when that checkpoint comes. A resumed unit continues with its remaining
blocks; nothing is recomputed (an optional ``resume_overhead_s`` models restarting).

Admission decisions: ``Reject`` closes a request unserved (on arrival, or later when the
policy gives up on a late one that is queued or paused: ``give_up.py``); ``Downgrade``
records the looser target it was given (results report attainment against both the original
and the downgraded targets). A ``Discard`` of a paused unit whose requests are still live (an eviction to stay
within a worker's KV budget, ``SimulatorConfig.kv_budget``) drops the unit's progress; those requests stay open and must be
run again from token 0, and the compute they lost is counted as wasted.

The simulator checks every decision against the contract (idle worker, contiguous chunks on
the worker that holds the earlier KV, paused unit present) and raises ``PolicyContractError``
naming the decision, so a policy bug surfaces here rather than as a wrong number.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from flowprefill_ray.scheduling.events import (
    Arrival,
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
    WorkUnit,
)

from .config import SimulatorConfig
from .cost_model import CostModel, ItemShape, UnitTimeline, plan_unit
from .prefix_cache import SimulatedPrefixCaches
from .results import RequestOutcome, SimulationResult, WorkerStats

if TYPE_CHECKING:
    from flowprefill_ray.scheduling.request import Request
    from flowprefill_ray.scheduling.timeline import Timeline


class SchedulingPolicy(Protocol):
    def on_event(self, event: Event, now: float) -> list[Decision]: ...


class PolicyContractError(RuntimeError):
    """The policy asked for something a worker cannot do; the message names the decision."""


class SimulationStalled(RuntimeError):
    """The event queue emptied while requests were still unfinished."""


@dataclass(slots=True)
class _Run:
    """A unit executing on a worker (or its paused state when ``run_start`` is None)."""

    unit: WorkUnit
    cost: UnitTimeline
    progress_s: float = 0.0  # position in the unit's compute timeline at the last stop (s)
    compute_s: float = 0.0  # compute time of earlier runs, resume overheads included (s)
    run_start: float = 0.0  # simulated time this run began
    lead_s: float = 0.0  # unit and resume overheads at the start of this run (s)
    token: int = 0  # matches the scheduled end/pause event of this run (unique per run)
    preempted_at: float | None = None
    stop_at_s: float | None = None  # the checkpoint it will stop at, once preempted


@dataclass(slots=True)
class _Worker:
    stats: WorkerStats
    running: _Run | None = None
    paused: dict[int, _Run] = field(default_factory=dict)  # unit id -> paused state
    stopping: bool = False  # its running unit was told to pause
    # One-hop handover: the unit sent with the preemption, started when the running one stops.
    queued: tuple[WorkUnit, UnitTimeline] | None = None


# Event kinds in the heap; at equal times a unit's end/pause is handled before an arrival so
# that the policy sees the freed worker first.
_END, _PAUSE, _ARRIVAL = 0, 1, 2


class Simulator:
    """Runs one policy over a list of requests. A simulator (and its policy) runs once.

    ``timeline`` (optional, ``flowprefill_ray.scheduling.timeline.Timeline``) records every
    event and the policy's answer, for the why-late attribution and the Gantt chart."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        cost_model: CostModel,
        config: SimulatorConfig | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.policy = policy
        self.timeline = timeline
        self.cost_model = cost_model
        self.config = config or SimulatorConfig()
        self.worker_ids = [
            f"{self.config.worker_prefix}{i}" for i in range(self.config.num_workers)
        ]
        self._workers = {w: _Worker(WorkerStats(w)) for w in self.worker_ids}
        self._heap: list[tuple] = []
        self._seq = 0
        self._now = 0.0
        self._requests: dict[str, Request] = {}
        self._outcomes: dict[str, RequestOutcome] = {}
        self._done_tokens: dict[str, int] = {}  # prompt tokens whose KV exists
        self._kv_worker: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}  # request -> unit id holding it
        self._decisions: Counter[str] = Counter()
        self._work_s = 0.0
        self._ignored_preempts = 0
        self._tokens = 0
        self._last_event_s = 0.0  # time of the last event that was not a cancelled end
        self._ran = False
        self.prefix_caches = SimulatedPrefixCaches(
            self.worker_ids, self.config.prefix_cache_blocks, self.config.prefix_block_tokens
        )

    # ------------------------------------------------------------------ public

    def run(self, requests: Sequence[Request]) -> SimulationResult:
        """Simulate until every request has finished its prefill or was rejected."""
        if self._ran:
            raise RuntimeError("a Simulator runs once; build a new one (with a fresh policy)")
        self._ran = True
        started = time.perf_counter()
        for req in requests:
            if req.request_id in self._requests:
                raise ValueError(f"duplicate request_id {req.request_id!r}")
            self._requests[req.request_id] = req
            self._push(req.arrival_s, _ARRIVAL, req.request_id, 0)
        for w in self.worker_ids:
            self._deliver(WorkerJoined(w, self.config.kv_budget))

        events = 0
        max_events = self.config.max_events
        while self._heap:
            t, kind, _, a, b = heapq.heappop(self._heap)
            self._now = t
            events += 1
            if events > max_events:
                raise SimulationStalled(f"more than {max_events} events: is the policy livelocked?")
            if kind == _ARRIVAL:
                req = self._requests[a]
                self._outcomes[a] = RequestOutcome(
                    a,
                    req.slo_class,
                    req.arrival_s,
                    req.prompt_tokens,
                    req.deadline_s - req.arrival_s,
                )
                self._done_tokens[a] = 0
                self._deliver(Arrival(req))
            elif kind == _END:
                self._on_end(a, b)
            else:
                self._on_pause(a, b)

        unfinished = [r for r in self._requests.values() if not self._closed(r.request_id)]
        if unfinished:
            ids = ", ".join(r.request_id for r in unfinished[:5])
            raise SimulationStalled(
                f"{len(unfinished)} requests never finished (e.g. {ids}); the policy left them "
                f"waiting with no event pending"
            )
        return SimulationResult(
            outcomes=[self._outcomes[r.request_id] for r in requests],
            workers=[w.stats for w in self._workers.values()],
            decisions=dict(self._decisions),
            makespan_s=self._last_event_s,
            work_s=self._work_s,
            events=events,
            wall_s=time.perf_counter() - started,
            ignored_preempts=self._ignored_preempts,
        )

    # ------------------------------------------------------------------ event plumbing

    def _push(self, t: float, kind: int, a, b) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, a, b))

    def _new_token(self) -> int:
        # Unique across all runs: a stale end event of one unit must never match another's.
        self._tokens += 1
        return self._tokens

    def _deliver(self, event: Event) -> None:
        self._last_event_s = self._now
        decisions = self.policy.on_event(event, self._now)
        if self.timeline is not None:
            self.timeline.record(event, self._now, decisions)
        for decision in decisions:
            self._decisions[type(decision).__name__] += 1
            if isinstance(decision, RunUnit):
                self._run_unit(decision)
            elif isinstance(decision, Preempt):
                self._preempt(decision)
            elif isinstance(decision, Resume):
                self._resume(decision)
            elif isinstance(decision, Discard):
                self._discard(decision)
            elif isinstance(decision, Reject):
                self._reject(decision)
            elif isinstance(decision, Downgrade):
                self._downgrade(decision)
            elif isinstance(decision, Overtaken):
                pass  # demoted in the queue, its target kept: nothing to execute or re-account
            else:
                raise PolicyContractError(f"unknown decision {decision!r}")

    def _closed(self, request_id: str) -> bool:
        o = self._outcomes.get(request_id)
        return o is not None and (o.finished or o.rejected)

    def _worker(self, worker_id: str, decision: Decision) -> _Worker:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise PolicyContractError(f"{decision!r}: no worker {worker_id!r}") from None

    # ------------------------------------------------------------------ decisions

    def _run_unit(self, d: RunUnit) -> None:
        unit = d.unit
        worker = self._worker(unit.worker_id, d)
        if worker.running is not None and (not worker.stopping or worker.queued is not None):
            raise PolicyContractError(
                f"{d!r}: worker is busy with unit {worker.running.unit.unit_id}"
            )
        if not unit.items:
            raise PolicyContractError(f"{d!r}: a unit needs at least one item")
        shapes = []
        for item in unit.items:
            rid = item.request_id
            req = self._requests.get(rid)
            if req is None or rid not in self._outcomes:
                raise PolicyContractError(f"{d!r}: request {rid!r} has not arrived")
            if self._closed(rid):
                raise PolicyContractError(f"{d!r}: request {rid!r} is already finished or rejected")
            if rid in self._in_flight:
                raise PolicyContractError(
                    f"{d!r}: request {rid!r} is already in unit {self._in_flight[rid]}"
                )
            if not 0 <= item.start < item.end <= req.prompt_tokens:
                raise PolicyContractError(
                    f"{d!r}: item [{item.start}, {item.end}) is outside the prompt of {req.prompt_tokens} tokens"
                )
            start = item.start
            if start > 0 and self._done_tokens[rid] == 0 and req.prefix_hashes:
                # A prefix-cache hit: [0, start) comes from the worker's cache, or is recomputed.
                start = self.prefix_caches.start(unit.worker_id, req, item.start)
            elif start > 0:
                if (
                    item.start != self._done_tokens[rid]
                    or self._kv_worker.get(rid) != unit.worker_id
                ):
                    raise PolicyContractError(
                        f"{d!r}: chunk starting at {item.start} needs the KV of [0, {item.start}) on "
                        f"{unit.worker_id}, but {self._done_tokens[rid]} tokens are done on "
                        f"{self._kv_worker.get(rid)}"
                    )
            shapes.append(ItemShape(item.end - start, start))
        cost = plan_unit(self.cost_model, shapes, self.config.max_forward_tokens)
        for item in unit.items:
            self._in_flight[item.request_id] = unit.unit_id
        if worker.running is not None:  # sent with the preemption: starts at the checkpoint
            worker.queued = (unit, cost)
            return
        self._start(worker, unit, cost, self.config.unit_overhead_s)

    def _start(self, worker: _Worker, unit: WorkUnit, cost: UnitTimeline, lead: float) -> None:
        run = _Run(unit, cost, run_start=self._now, lead_s=lead, token=self._new_token())
        self._work_s += lead
        worker.running = run
        worker.stats.units_started += 1
        self._push(self._now + lead + cost.total_s, _END, unit.worker_id, run.token)

    def _preempt(self, d: Preempt) -> None:
        worker = self._worker(d.worker_id, d)
        run = worker.running
        if run is None or run.unit.unit_id != d.unit_id or run.stop_at_s is not None:
            # It finished (or is already stopping) at this very instant: the policy will hear
            # UnitCompleted / UnitPaused for it, as the contract allows.
            self._ignored_preempts += 1
            return
        worker.stopping = True
        progress = run.progress_s + max(0.0, self._now - run.run_start - run.lead_s)
        stop = run.cost.next_checkpoint(progress, self.config.granularity)
        if stop is None:
            return  # no checkpoint before its end: it completes as scheduled
        run.token = self._new_token()  # cancels the scheduled end
        run.preempted_at = self._now
        run.stop_at_s = stop
        stop_time = max(self._now, run.run_start + run.lead_s + (stop - run.progress_s))
        self._push(stop_time, _PAUSE, d.worker_id, run.token)

    def _resume(self, d: Resume) -> None:
        worker = self._worker(d.worker_id, d)
        if worker.running is not None:
            raise PolicyContractError(
                f"{d!r}: worker is busy with unit {worker.running.unit.unit_id}"
            )
        run = worker.paused.pop(d.unit_id, None)
        if run is None:
            raise PolicyContractError(f"{d!r}: worker holds no paused unit {d.unit_id}")
        run.run_start = self._now
        run.lead_s = self.config.resume_overhead_s + self.config.unit_overhead_s
        self._work_s += run.lead_s
        run.token = self._new_token()
        run.preempted_at = run.stop_at_s = None
        worker.running = run
        worker.stats.resumes += 1
        end = self._now + run.lead_s + (run.cost.total_s - run.progress_s)
        self._push(end, _END, d.worker_id, run.token)

    def _discard(self, d: Discard) -> None:
        worker = self._worker(d.worker_id, d)
        run = worker.paused.pop(d.unit_id, None)
        if run is None:
            raise PolicyContractError(f"{d!r}: worker holds no paused unit {d.unit_id}")
        worker.stats.discarded_s += run.compute_s
        self._work_s += run.progress_s  # the blocks it got through before it was dropped
        for item in run.unit.items:
            self._in_flight.pop(item.request_id, None)
            if not self._closed(item.request_id):
                # Still open: evicted for memory; the policy will run it again from token 0.
                self._outcomes[item.request_id].evictions += 1

    def _reject(self, d: Reject) -> None:
        outcome = self._outcomes.get(d.request_id)
        if outcome is None:
            raise PolicyContractError(f"{d!r}: request has not arrived")
        unit_id = self._in_flight.get(d.request_id)
        if unit_id is not None and not self._paused_anywhere(unit_id):
            # A member of a paused unit may be given up (give_up.py); a computing one not.
            raise PolicyContractError(f"{d!r}: request is in running unit {unit_id}")
        if outcome.finished or outcome.rejected:
            raise PolicyContractError(f"{d!r}: request is already finished or rejected")
        outcome.rejected = True

    def _paused_anywhere(self, unit_id: int) -> bool:
        return any(unit_id in w.paused for w in self._workers.values())

    def _downgrade(self, d: Downgrade) -> None:
        outcome = self._outcomes.get(d.request_id)
        if outcome is None:
            raise PolicyContractError(f"{d!r}: request has not arrived")
        if d.request_id in self._in_flight or self._closed(d.request_id):
            raise PolicyContractError(f"{d!r}: only a request on arrival can be downgraded")
        if not d.ttft_slo_s > outcome.ttft_slo_s:
            raise PolicyContractError(
                f"{d!r}: a downgrade must loosen the target ({outcome.ttft_slo_s:.3f}s)"
            )
        outcome.downgraded_class = d.slo_class
        outcome.downgraded_slo_s = d.ttft_slo_s

    # ------------------------------------------------------------------ worker events

    def _stop_run(self, worker: _Worker, run: _Run) -> float:
        """Close the current run of ``run``; returns its duration (s)."""
        duration = self._now - run.run_start
        worker.stats.busy_s += duration
        run.compute_s += duration
        worker.running = None
        worker.stopping = False
        if worker.queued is not None:
            # One-hop handover: the worker already has its next unit and no call to wait for.
            unit, cost = worker.queued
            worker.queued = None
            self._start(worker, unit, cost, 0.0)
        return duration

    def _on_end(self, worker_id: str, token: int) -> None:
        worker = self._workers[worker_id]
        run = worker.running
        if run is None or run.token != token:
            return  # this end was cancelled by a preempt
        self._stop_run(worker, run)
        # Conservation bookkeeping from the cost model, independent of the event times.
        self._work_s += run.cost.total_s
        worker.stats.units_completed += 1
        for item in run.unit.items:
            rid = item.request_id
            del self._in_flight[rid]
            self._done_tokens[rid] = item.end
            self._kv_worker[rid] = worker_id
            if item.end == self._requests[rid].prompt_tokens:
                self.prefix_caches.store(worker_id, self._requests[rid])
                outcome = self._outcomes[rid]
                outcome.prefill_completions += 1
                if outcome.ttft_s is None:
                    outcome.ttft_s = self._now - outcome.arrival_s + self.config.response_overhead_s
                    if self.timeline is not None and self.config.response_overhead_s:
                        # What a client would see: the serving path's share shows up apart.
                        self.timeline.note_client_ttft(rid, outcome.ttft_s)
        self._deliver(UnitCompleted(worker_id, run.unit.unit_id, run.compute_s))

    def _on_pause(self, worker_id: str, token: int) -> None:
        worker = self._workers[worker_id]
        run = worker.running
        if run is None or run.token != token:
            return
        self._stop_run(worker, run)
        blocking = self._now - run.preempted_at
        run.progress_s = run.stop_at_s
        worker.paused[run.unit.unit_id] = run
        worker.stats.pauses += 1
        worker.stats.blocking_s.append(blocking)
        for item in run.unit.items:
            self._outcomes[item.request_id].preemptions += 1
        self._deliver(UnitPaused(worker_id, run.unit.unit_id, run.compute_s, blocking))
