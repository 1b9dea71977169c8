"""``admission.queue_cost: measured``: the waiting work ahead of an arrival is priced at what
recent units of its own and tighter targets cost, not at the sum of single-prompt predictions.

Policies are driven by hand with the linear predictor of ``policy_helpers`` (1024 tokens take
exactly 1 s), as in tests/test_admission.py, so every bound below is exact.
"""

from __future__ import annotations

import pytest
from policy_helpers import arrive, policy, run

from flowprefill_ray.scheduling import AdmissionConfig
from flowprefill_ray.scheduling.admission import MIN_QUEUE_COST
from flowprefill_ray.scheduling.arrival_rates import ArrivalRates
from flowprefill_ray.scheduling.events import Reject, UnitCompleted


def pricing(cost: str) -> AdmissionConfig:
    return AdmissionConfig(action="reject", estimate="queue", queue_cost=cost)


def feed_units_at(p, ratio: float, count: int = 10) -> float:
    """``count`` tight (2 s target) requests of 0.25 s predicted, one per second on the idle
    worker, each completed after ``ratio`` x 0.25 s of compute. Returns the time after."""
    for i in range(count):
        assert arrive(p, f"t{i}", float(i), 256, 2.0) == [run(1 + i, "w0", (f"t{i}", 0, 256))]
        assert p.on_event(UnitCompleted("w0", 1 + i, 0.25 * ratio), i + 0.5) == []
    return float(count)


def queue_behind_a_running_unit(p, now: float) -> None:
    """w0 runs 4 s of work due in 4 s (no slack: nothing preempts it); a and b, 1 s each, wait
    due at now + 6 s."""
    assert arrive(p, "busy", now, 4096, 4.0) == [run(11, "w0", ("busy", 0, 4096))]
    assert arrive(p, "a", now, 1024, 6.0) == []
    assert arrive(p, "b", now, 1024, 6.0) == []


def test_measured_cost_admits_what_the_batched_queue_leaves_room_for():
    predicted = policy(admission=pricing("predicted"))
    measured = policy(admission=pricing("measured"))
    for p in (predicted, measured):
        now = feed_units_at(p, 0.5)
        queue_behind_a_running_unit(p, now)
    assert measured.admission.waiting_cost(6.5, now) == 0.5
    # Nothing is discounted unless asked for.
    assert predicted.admission.waiting_cost(6.5, now) == 1.0
    # c, 1 s due in 6.5 s: 4 s running + a + b (2 s predicted) + its own 1 s = 7 s, refused.
    (refused,) = arrive(predicted, "c", now, 1024, 6.5)
    assert isinstance(refused, Reject)
    assert "after 6.000s of earlier work" in refused.reason
    # Priced at what units cost lately, a and b take 1 s: 4 + 1 + 1 = 6 s fits. The running
    # unit is charged in full, and so is the arrival's own prefill (it may run alone).
    (too_long,) = arrive(measured, "d", now, 2048, 6.5)
    assert isinstance(too_long, Reject)
    assert "after 5.000s of earlier work" in too_long.reason
    assert arrive(measured, "c", now, 1024, 6.5) == []


def test_the_price_is_capped_at_the_prediction_and_floored():
    """Units that overran do not make the estimate stricter than predicted (the online
    correction owns that); units that ran very fast discount at most to MIN_QUEUE_COST."""
    slow = policy(admission=pricing("measured"))
    fast = policy(admission=pricing("measured"))
    feed_units_at(slow, 2.0)
    feed_units_at(fast, 0.125)
    assert slow.admission.arrivals.cost_ratio_upto(6.0, 10.0) == pytest.approx(2.0)
    assert slow.admission.waiting_cost(6.0, 10.0) == 1.0
    assert fast.admission.arrivals.cost_ratio_upto(6.0, 10.0) == pytest.approx(0.125)
    assert fast.admission.waiting_cost(6.0, 10.0) == MIN_QUEUE_COST


def test_only_the_arrival_s_own_and_tighter_targets_set_its_price():
    """A loose class's long prompts batch little; their cost must not discount the work
    ahead of a tight arrival, which is mostly tight work. Decay keeps the ratio."""
    rates = ArrivalRates(window_s=30.0)
    rates.observe_cost(2.0, 0.5, 1.0, 0.0)  # tight work at half its prediction
    rates.observe_cost(20.0, 3.0, 3.0, 0.0)  # loose work as predicted
    assert rates.cost_ratio_upto(1.0, 0.0) == 1.0  # nothing that tight yet
    assert rates.cost_ratio_upto(2.0, 0.0) == pytest.approx(0.5)
    assert rates.cost_ratio_upto(20.0, 0.0) == pytest.approx(3.5 / 4.0)
    assert rates.cost_ratio_upto(20.0, 30.0) == pytest.approx(3.5 / 4.0)
    rates.observe_cost(20.0, 1.0, 1.0, 30.0)  # newer work weighs more than older
    decay = 0.36787944117144233  # e^-1: the first sums, 30 s older
    assert rates.cost_ratio_upto(20.0, 30.0) == pytest.approx(
        ((0.5 + 3.0) * decay + 1.0) / ((1.0 + 3.0) * decay + 1.0)
    )
