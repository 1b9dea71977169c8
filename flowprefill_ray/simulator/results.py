"""What a simulation run produces, and the summaries computed from it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutcome:
    """One request's fate. Times in seconds of simulated time.

    ``ttft_s`` is the time from arrival to the end of the request's prefill (its first token
    comes out of the prefill); None when the request was rejected. ``ttft_slo_s`` is the
    request's original target; ``downgraded_slo_s`` the looser one admission control gave it
    (None if it was not downgraded).
    """

    request_id: str
    slo_class: str
    arrival_s: float
    prompt_tokens: int
    ttft_slo_s: float
    ttft_s: float | None = None
    preemptions: int = 0  # pauses of units that held this request
    rejected: bool = False
    prefill_completions: int = 0  # times its last prompt token was computed (must end at 1)
    downgraded_class: str | None = None
    downgraded_slo_s: float | None = None
    evictions: int = 0  # times a paused unit holding it was discarded for memory (recomputed)

    @property
    def finished(self) -> bool:
        return self.ttft_s is not None

    @property
    def met_slo(self) -> bool:
        """Met its original target."""
        # A tolerance of 1 ns absorbs float error when TTFT equals the target exactly.
        return self.ttft_s is not None and self.ttft_s <= self.ttft_slo_s + 1e-9

    @property
    def target_in_force_s(self) -> float:
        """The target it was admitted with: the downgraded one if any, else the original."""
        return self.ttft_slo_s if self.downgraded_slo_s is None else self.downgraded_slo_s

    @property
    def met_target_in_force(self) -> bool:
        """Met the target it was admitted with (a downgraded request: the looser one)."""
        return self.ttft_s is not None and self.ttft_s <= self.target_in_force_s + 1e-9


@dataclass(slots=True)
class WorkerStats:
    """Per worker: ``busy_s`` = compute time (overheads included) over the run; the rest."""

    worker_id: str
    busy_s: float = 0.0
    units_started: int = 0
    units_completed: int = 0
    pauses: int = 0
    resumes: int = 0
    discarded_s: float = 0.0  # compute spent on units later discarded (wasted)
    blocking_s: list[float] = field(default_factory=list)  # preempt decision -> stop, per pause


@dataclass(slots=True)
class SimulationResult:
    """Everything a run measured. ``work_s`` is the compute the units needed (sum of each
    started unit's executed time), so ``sum(busy_s) == work_s`` is the conservation check."""

    outcomes: list[RequestOutcome]
    workers: list[WorkerStats]
    decisions: dict[str, int]
    makespan_s: float
    work_s: float
    events: int
    wall_s: float
    ignored_preempts: int = 0  # preempts of a unit no longer running (it had just finished)

    @property
    def attainment(self) -> float:
        """Fraction of requests (rejected ones included) that met their original TTFT SLO."""
        if not self.outcomes:
            return 1.0
        return sum(o.met_slo for o in self.outcomes) / len(self.outcomes)

    @property
    def attainment_in_force(self) -> float:
        """Fraction of requests (rejected ones included) that met the target they were
        admitted with (downgraded ones: the looser target)."""
        if not self.outcomes:
            return 1.0
        return sum(o.met_target_in_force for o in self.outcomes) / len(self.outcomes)

    @property
    def admitted_attainment(self) -> float:
        """Among admitted (not rejected) requests, the fraction that met the target they were
        admitted with; 1.0 if none was admitted."""
        admitted = [o for o in self.outcomes if not o.rejected]
        if not admitted:
            return 1.0
        return sum(o.met_target_in_force for o in admitted) / len(admitted)

    @property
    def evictions(self) -> int:
        """Requests' paused progress discarded for memory (each is recomputed)."""
        return sum(o.evictions for o in self.outcomes)

    @property
    def downgraded(self) -> int:
        return sum(o.downgraded_slo_s is not None for o in self.outcomes)

    @property
    def worst_class_attainment(self) -> float:
        """The lowest per-class attainment: a criterion under which no class may be sacrificed."""
        by_class = self.attainment_by_class()
        return min(by_class.values()) if by_class else 1.0

    def attainment_by_class(self) -> dict[str, float]:
        groups = _by_class(self.outcomes)
        return {c: sum(o.met_slo for o in g) / len(g) for c, g in groups.items()}

    def ttft_percentiles(
        self, quantiles: Sequence[float] = (0.5, 0.9, 0.99)
    ) -> dict[str, dict[str, float]]:
        """TTFT (seconds) quantiles per class and over ``all``; rejected requests excluded."""
        groups = _by_class(self.outcomes)
        groups["all"] = list(self.outcomes)
        table = {}
        for cls, group in groups.items():
            ttfts = sorted(o.ttft_s for o in group if o.ttft_s is not None)
            table[cls] = {f"p{round(q * 100):d}": percentile(ttfts, q) for q in quantiles}
        return table

    @property
    def preemptions(self) -> int:
        return sum(w.pauses for w in self.workers)

    @property
    def rejected(self) -> int:
        return sum(o.rejected for o in self.outcomes)

    @property
    def mean_blocking_s(self) -> float:
        blocks = [b for w in self.workers for b in w.blocking_s]
        return sum(blocks) / len(blocks) if blocks else 0.0

    def summary(self) -> dict:
        """A JSON-ready digest: attainment overall and per class, TTFT quantiles, counts."""
        return {
            "requests": len(self.outcomes),
            "attainment": self.attainment,  # against the original targets
            "attainment_by_class": self.attainment_by_class(),
            "ttft_s": self.ttft_percentiles(),
            "preemptions": self.preemptions,
            "mean_blocking_ms": self.mean_blocking_s * 1e3,
            "rejected": self.rejected,
            "downgraded": self.downgraded,
            "evictions": self.evictions,
            # Against the targets after admission: downgraded requests at their looser target.
            "attainment_in_force": self.attainment_in_force,
            "admitted_attainment": self.admitted_attainment,
            "decisions": dict(self.decisions),
            "utilisation": (
                sum(w.busy_s for w in self.workers) / (self.makespan_s * len(self.workers))
                if self.makespan_s > 0 and self.workers
                else 0.0
            ),
            "makespan_s": self.makespan_s,
            "wall_s": self.wall_s,
        }


def _by_class(outcomes: Iterable[RequestOutcome]) -> dict[str, list[RequestOutcome]]:
    groups: dict[str, list[RequestOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.slo_class, []).append(o)
    return groups


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` (0..1) of ascending values; NaN if empty."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
