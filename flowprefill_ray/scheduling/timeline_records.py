"""What the scheduler timeline keeps per request, per unit and per pause, and its JSON form.

Slotted dataclasses mutated by ``timeline.Timeline`` on every event (cheap), turned into plain
dicts only on export. The export's fields are listed in docs/SCHEDULING.md ("Scheduler
timeline and why-late attribution").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class PauseTrace:
    """One stop of a unit. ``preempt_s``: when the Preempt was decided; ``paused_s``: when the
    worker reported the unit paused; ``by_unit``: the unit started or resumed on that worker in
    the same decision list (who took the worker); ``resumed_s``: None while still paused."""

    preempt_s: float | None
    paused_s: float
    executed_s: float  # the unit's compute before this stop (UnitPaused.executed_s)
    blocking_s: float
    by_unit: int | None = None
    resumed_s: float | None = None


@dataclass(slots=True, eq=False)
class UnitTrace:
    unit_id: int
    worker_id: str
    members: tuple[tuple[str, int, int], ...]  # (request_id, start, end) prompt tokens
    tokens: int
    predicted_s: float  # the predictor's compute for ``tokens`` when the unit started
    started_s: float
    runs: list[list[Any]] = field(default_factory=list)  # [start, end or None while running]
    pauses: list[PauseTrace] = field(default_factory=list)
    pending_preempt_s: float | None = None  # a Preempt decided, no UnitPaused heard yet
    took_over: tuple[int, float | None] | None = None  # (paused unit, its preempt time)
    ended_s: float | None = None
    actual_s: float | None = None  # UnitCompleted.executed_s
    outcome: str = "running"  # running | paused | completed | discarded | lost


@dataclass(slots=True, eq=False)
class RequestTrace:
    seq: int  # arrival order, for export
    request_id: str
    slo_class: str  # in force (after a downgrade, the new class)
    original_class: str
    arrival_s: float
    ttft_slo_s: float  # in force
    original_ttft_slo_s: float
    prompt_tokens: int
    predicted_s: float  # its own prefill alone, predicted on arrival
    status: str = "waiting"  # waiting|running|paused|partial|finished|rejected|cancelled
    worker_id: str | None = None
    first_start_s: float | None = None
    first_token_s: float | None = None
    client_ttft_s: float | None = None
    closed_s: float | None = None
    reason: str | None = None  # why it was rejected
    # (unit, start, end, predicted compute of its tokens after ``end``) per unit it joined
    stages: list[tuple[UnitTrace, int, int, float]] = field(default_factory=list)
    requeues: list[tuple[float, str]] = field(default_factory=list)  # (time, why)
    # The unit its arrival asked to preempt (a Preempt in its Arrival's decisions), and when.
    preempt_asked: tuple[UnitTrace, float] | None = None
    # (time, tighter-class request) each time one overtook it (events.Overtaken: demoted).
    overtaken: list[tuple[float, str]] = field(default_factory=list)


def request_dict(r: RequestTrace) -> dict[str, Any]:
    first = r.first_token_s
    return {
        "request_id": r.request_id,
        "slo_class": r.slo_class,
        "original_class": r.original_class,
        "arrival_s": r.arrival_s,
        "ttft_slo_s": r.ttft_slo_s,
        "original_ttft_slo_s": r.original_ttft_slo_s,
        "deadline_s": r.arrival_s + r.ttft_slo_s,
        "prompt_tokens": r.prompt_tokens,
        "predicted_s": r.predicted_s,
        "status": r.status,
        "worker_id": r.worker_id,
        "first_start_s": r.first_start_s,
        "first_token_s": first,
        "ttft_s": None if first is None else first - r.arrival_s,
        "client_ttft_s": r.client_ttft_s,
        "closed_s": r.closed_s,
        "reason": r.reason,
        "units": [
            {"unit_id": u.unit_id, "start": s, "end": e, "rest_predicted_s": rest}
            for u, s, e, rest in r.stages
        ],
        "requeues": [{"at_s": t, "why": why} for t, why in r.requeues],
        "overtaken": [{"at_s": t, "by": by} for t, by in r.overtaken],
        "preempt_asked": (
            None
            if r.preempt_asked is None
            else {"unit_id": r.preempt_asked[0].unit_id, "at_s": r.preempt_asked[1]}
        ),
    }


def unit_dict(u: UnitTrace) -> dict[str, Any]:
    return {
        "unit_id": u.unit_id,
        "worker_id": u.worker_id,
        "members": [{"request_id": rid, "start": s, "end": e} for rid, s, e in u.members],
        "tokens": u.tokens,
        "predicted_s": u.predicted_s,
        "actual_s": u.actual_s,
        "started_s": u.started_s,
        "ended_s": u.ended_s,
        "outcome": u.outcome,
        "runs": [list(run) for run in u.runs],
        "pauses": [
            {
                "preempt_s": p.preempt_s,
                "paused_s": p.paused_s,
                "resumed_s": p.resumed_s,
                "executed_s": p.executed_s,
                "blocking_s": p.blocking_s,
                "by_unit": p.by_unit,
            }
            for p in u.pauses
        ],
        "took_over": (
            None
            if u.took_over is None
            else {"unit_id": u.took_over[0], "preempt_s": u.took_over[1]}
        ),
    }
