"""Predicted work at a given ``now``: what a unit still needs, and what waits before a deadline.

FlowPrefill ranks running and paused units by the slack of the member they can still make
(``unit_slack_and_due_s``); admission control's ``queue`` estimate asks how much predicted work
runs before a new request (``work_ahead_s``) and how much it may add without pushing an
admitted one late (``spare_work_s``). Both read the policy's units, workers and waiting-work
index through the ``Policy`` that inherits this class; nothing here changes state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .priority import slack_s
from .records import UnitRecord

if TYPE_CHECKING:
    from .config import PolicyConfig
    from .predictor import TTFTPredictor
    from .records import WorkerRecord
    from .waiting_work import WaitingWork


class WorkEstimates:
    """Mixed into ``Policy`` (policy.py), whose state it reads."""

    # Provided by Policy.
    config: PolicyConfig
    predictor: TTFTPredictor
    preemptive: bool
    workers: dict[str, WorkerRecord]
    waiting_work: WaitingWork | None
    counters: dict[str, int]
    _loads: list[tuple[float, bool, bool, float]]
    _loads_key: tuple[int, float] | None

    def unit_remaining_s(self, u: UnitRecord, now: float) -> float:
        """Predicted compute seconds ``u`` still needs at ``now`` (>= 0)."""
        remaining = self.predictor.predict(u.tokens) - u.executed_at(now)
        return remaining if remaining > 0.0 else 0.0

    def unit_slack_and_due_s(self, u: UnitRecord, now: float) -> tuple[float, float]:
        """``(slack, deadline)`` of the request ``u`` is ranked by (``UnitRecord.due_s``: its
        most urgent member that can still make its deadline) if ``u`` (re)started at ``now``,
        seconds; the slack is negative when no member can."""
        remaining = self.unit_remaining_s(u, now)
        if self.config.late_grace and u.executed_at(now) > 0.0:
            remaining *= self.late_band()
        due = u.due_s(now, remaining)[1]
        return slack_s(due, now, remaining), due

    def late_band(self) -> float:
        """What a started unit's predicted remaining compute is scaled by before it is judged
        late (``late_grace``): the predictor's recent 10th-percentile actual/predicted ratio,
        1 when the grace is off. A unit with sunk work is demoted behind every feasible
        request once judged late, and pausing it there has cost units nearly done on CPU
        their deadlines (large batches ran 10-20 % under their predictions; issue 14)."""
        if not (self.config.late_grace and self.config.online_correction):
            return 1.0
        return self.predictor.underrun_ratio

    def unit_slack_s(self, u: UnitRecord, now: float) -> float:
        """Slack of the request ``u`` is ranked by (see ``unit_slack_and_due_s``), seconds."""
        return self.unit_slack_and_due_s(u, now)[0]

    def _unit_loads(self, now: float) -> list[tuple[float, bool, bool, float]]:
        """``(deadline_s, running, feasible, remaining_s)`` of every running, pausing and
        paused unit at ``now``. Computed once per event: an arrival under ``downgrade`` asks
        the estimate once per candidate class, and the state does not change in between."""
        key = (self.counters["events"], now)
        if self._loads_key != key:
            loads = []
            predict = self.predictor.predict
            band = self.late_band()
            for w in self.workers.values():
                u = w.running
                if u is not None:
                    ran = now - u.started_at_s  # as in UnitRecord.executed_at, inlined
                    left = predict(u.tokens) - u.executed_s - (ran if ran > 0.0 else 0.0)
                    remaining = left if left > 0.0 else 0.0
                    started = u.executed_s > 0.0 or ran > 0.0
                    feasible, due = u.due_s(now, remaining * band if started else remaining)
                    loads.append((due, True, feasible, remaining))
                if w.paused:
                    for u in w.paused.values():
                        left = predict(u.tokens) - u.executed_s  # paused: no time accrues
                        remaining = left if left > 0.0 else 0.0
                        started = u.executed_s > 0.0
                        feasible, due = u.due_s(now, remaining * band if started else remaining)
                        loads.append((due, False, feasible, remaining))
            self._loads, self._loads_key = loads, key
        return self._loads

    def work_ahead_s(
        self,
        deadline_s: float,
        now: float,
        waiting_cost: float = 1.0,
        waiting: WaitingWork | None = None,
    ) -> float:
        """Predicted seconds until a request due at ``deadline_s`` would start, if every
        worker shared the work that runs before it under earliest-deadline-first: running
        units' remaining compute (under a preemptive policy only those due no later and still
        feasible), paused units due no later and still feasible, and waiting feasible
        requests due no later (the ``queue`` admission estimate, O(units + log n)), their
        predicted prefill scaled by ``waiting_cost`` (``admission.queue_cost``).
        ``waiting``: another waiting-work index (one tier's, overtaking.py) than the queue's."""
        if waiting is None:  # (an empty index is falsy: test for None)
            waiting = self.waiting_work
        total = self._work_before_s(deadline_s, now, waiting, waiting_cost)
        return total / len(self.workers) if self.workers else float("inf")

    def _work_before_s(
        self,
        deadline_s: float,
        now: float,
        waiting: WaitingWork | None,
        waiting_cost: float = 1.0,
    ) -> float:
        """``work_ahead_s``'s work, summed over the workers rather than spread over them."""
        total = 0.0
        # A running unit keeps its worker whatever its rank (flowprefill's preemption ablated).
        anyway = not (self.preemptive and self.config.preemption)
        for due, running, feasible, remaining in self._unit_loads(now):
            if (running and anyway) or (feasible and due <= deadline_s):
                total += remaining
        if waiting is not None:
            total += waiting.work_before_s(deadline_s, now) * waiting_cost
        return total

    @property
    def worker_count(self) -> int:
        """Prefill workers known to the policy (the admission estimate spreads work over them)."""
        return len(self.workers)

    def spare_work_s(
        self, deadline_s: float, now: float, waiting: WaitingWork | None = None
    ) -> float:
        """Seconds of prefill a request due at ``deadline_s`` may add without pushing a
        protected waiting request due later past its deadline, charging every running unit
        and every feasible paused unit before that request (``inf`` when nothing is
        protected or the ``queue`` estimate is off). ``waiting`` as in ``work_ahead_s``.
        With ``admission.protect_units`` a running or paused unit due later is protected
        too (``units_spare_s``)."""
        if waiting is None:  # (an empty index is falsy: test for None)
            waiting = self.waiting_work
        if waiting is None or not self.config.admission.protect_admitted:
            return float("inf")
        loads = self._unit_loads(now)
        busy = sum(remaining for _, running, feasible, remaining in loads if running or feasible)
        spare = waiting.spare_work_s(deadline_s, now, len(self.workers), busy)
        if self.config.admission.protect_units:
            spare = min(spare, self.units_spare_s(deadline_s, now, waiting))
        return spare

    def units_spare_s(self, deadline_s: float, now: float, waiting: WaitingWork) -> float:
        """Seconds of prefill a request due at ``deadline_s`` may add before every feasible
        running or paused unit due later (by its most urgent member that can still make it)
        without pushing that member past its deadline, under ``work_ahead_s``'s estimate
        (work summed over the workers); ``inf`` when no such unit exists.

        Without it a request is protected only while it waits: once its unit starts, each
        tighter arrival due before it passes admission on its own deadline and preempts the
        unit, until the unit turns late and FlowPrefill demotes it behind all feasible work
        (two-core peer runs: most misses were such loose units, ``paused_after_late``).
        O(units^2 + units log n), units being the running and paused ones."""
        workers = len(self.workers)
        spare = float("inf")
        for due, _, feasible, _ in self._unit_loads(now):
            if not feasible or due <= deadline_s:
                continue  # a late unit is not protected; one due first runs first anyway
            before = self._work_before_s(due, now, waiting)  # the unit's own work included
            spare = min(spare, (due - now) * workers - before)
        return spare
