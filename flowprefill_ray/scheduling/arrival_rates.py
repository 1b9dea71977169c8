"""Recent demand and cost per TTFT target: what admission control reserves and discounts.

``ArrivalRates`` keeps, per target, an exponentially decaying rate of the predicted prefill
that arrives (``reserve_for_tighter``: the room a tighter class will need) and decaying sums
of what completed work cost against its prediction (``reserve_cost: measured``, and
``queue_cost: measured`` over every target at once). Plain Python: the simulator and the
Ray runtime share it through the policy.
"""

from __future__ import annotations

import math


class ArrivalRates:
    """Recent arrival rate of predicted prefill work per TTFT target (seconds of work per
    second), an exponentially decaying sum with time constant ``window_s``.

    ``expected_tighter_s(horizon_s)``: the work expected to arrive, and to be due, within
    ``horizon_s`` from requests with a tighter target ``T < horizon_s``: a request arriving
    at ``t`` is due at ``t + T``, so arrivals in the first ``horizon_s - T`` seconds are due
    within the horizon: ``sum(rate_T * (horizon_s - T))``. Under earliest-deadline-first they
    run before a request due at the horizon, so admitting it must leave that much room."""

    # Targets are kept on a 5 % logarithmic grid: explicit per-request targets then add at
    # most a few hundred entries, however many distinct values clients send.
    _GRID = math.log(1.05)

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        # grid step -> [rate, last update time, the largest target seen in the step]
        self._rates: dict[int, list[float]] = {}
        # grid step -> [compute, predicted, last update time]: decaying sums of what
        # completed work of that target cost, and what it was predicted to cost.
        self._costs: dict[int, list[float]] = {}

    def add(self, target_s: float, work_s: float, now: float) -> None:
        step = math.floor(math.log(target_s) / self._GRID)
        entry = self._rates.setdefault(step, [0.0, now, target_s])
        entry[0] = self._decayed(entry, now) + work_s / self.window_s
        entry[1] = now
        entry[2] = max(entry[2], target_s)  # exact for class targets; never too tight

    def observe_cost(self, target_s: float, actual_s: float, predicted_s: float, now: float):
        """Work of this target predicted at ``predicted_s`` took ``actual_s`` of compute."""
        step = math.floor(math.log(target_s) / self._GRID)
        cost = self._costs.setdefault(step, [0.0, 0.0, now])
        keep = math.exp(-(now - cost[2]) / self.window_s) if now > cost[2] else 1.0
        cost[0] = cost[0] * keep + actual_s
        cost[1] = cost[1] * keep + predicted_s
        cost[2] = now

    def cost_ratio(self, target_s: float) -> float:
        """Recent compute per predicted second of this target's work; 1 before any."""
        cost = self._costs.get(math.floor(math.log(target_s) / self._GRID))
        return cost[0] / cost[1] if cost is not None and cost[1] > 0.0 else 1.0

    def cost_ratio_upto(self, target_s: float, now: float) -> float:
        """Recent compute per predicted second of the work of every target up to
        ``target_s`` together (the sums decayed to ``now``); 1 before any."""
        top = math.floor(math.log(target_s) / self._GRID)
        actual = predicted = 0.0
        for step, (spent, owed, then) in self._costs.items():
            if step <= top:
                keep = math.exp(-(now - then) / self.window_s) if now > then else 1.0
                actual += spent * keep
                predicted += owed * keep
        return actual / predicted if predicted > 0.0 else 1.0

    def _decayed(self, entry: list[float], now: float) -> float:
        rate, then, _ = entry
        return rate * math.exp(-(now - then) / self.window_s) if now > then else rate

    def rate(self, target_s: float, now: float) -> float:
        """Seconds of predicted prefill per second arriving with this target, recently."""
        entry = self._rates.get(math.floor(math.log(target_s) / self._GRID))
        return 0.0 if entry is None else self._decayed(entry, now)

    def expected_tighter_s(self, horizon_s: float, now: float, measured: bool = False) -> float:
        """(``measured``: each target's work priced at its ``cost_ratio``.)"""
        total = 0.0
        for entry in self._rates.values():
            target = entry[2]
            if target < horizon_s:
                ratio = self.cost_ratio(target) if measured else 1.0
                total += self._decayed(entry, now) * (horizon_s - target) * ratio
        return total
