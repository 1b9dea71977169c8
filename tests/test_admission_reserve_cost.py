"""``admission.reserve_cost: measured``: the room kept for tighter classes is priced at what
their units have recently cost, not at the sum of their single-prompt predictions.

Policies are driven by hand with the linear predictor of ``policy_helpers`` (1024 tokens take
exactly 1 s), as in tests/test_admission.py.
"""

from __future__ import annotations

import math

import pytest
from policy_helpers import arrive, policy, run

from flowprefill_ray.scheduling import AdmissionConfig
from flowprefill_ray.scheduling.arrival_rates import ArrivalRates
from flowprefill_ray.scheduling.events import Reject, UnitCompleted


def reserving(cost: str) -> AdmissionConfig:
    return AdmissionConfig(
        action="reject",
        estimate="queue",
        protect_admitted=False,
        reserve_for_tighter=True,
        reserve_cost=cost,
    )


def feed_tight_work_at_half_its_prediction(p) -> None:
    """w0 busy until far ahead; on w1, one tight (2 s) request of 0.25 s predicted per second
    for 40 s, each completed after 0.125 s of compute - what sharing a forward with other
    prompts makes it cost. Then w1 is taken too, so the next arrival sees no idle worker."""
    assert arrive(p, "busy0", 0.0, 1024 * 60, 100.0) == [run(1, "w0", ("busy0", 0, 61440))]
    for i in range(40):
        assert arrive(p, f"t{i}", float(i), 256, 2.0) == [run(2 + i, "w1", (f"t{i}", 0, 256))]
        assert p.on_event(UnitCompleted("w1", 2 + i, 0.125), i + 0.2) == []
    assert arrive(p, "busy1", 40.0, 1024 * 60, 100.5) == [run(42, "w1", ("busy1", 0, 61440))]


def test_measured_cost_keeps_room_for_what_the_tight_work_really_takes():
    predicted = policy(workers=2, admission=reserving("predicted"))
    measured = policy(workers=2, admission=reserving("measured"))
    for p in (predicted, measured):
        feed_tight_work_at_half_its_prediction(p)
    assert measured.admission.arrivals.cost_ratio(2.0) == pytest.approx(0.5)
    # Nothing is measured unless asked for: the ratio stays 1.
    assert predicted.admission.arrivals.cost_ratio(2.0) == 1.0
    rate = measured.admission.arrivals.rate(2.0, 40.0)
    assert rate == pytest.approx(0.25 * (1 - math.exp(-40 / 30)), rel=0.05)
    # A 9.5 s request due in 10 s: tight requests arriving in the next 8 s fall due first.
    # Priced as predicted they need 8 x rate / 2 workers = 0.74 s: 9.5 + 0.74 > 10, refused.
    (refused,) = arrive(predicted, "loose", 40.0, 9728, 10.0)
    assert isinstance(refused, Reject)
    assert f"and {rate * 8 / 2:.3f}s kept for tighter SLO classes" in refused.reason
    # At what they cost, half that: 9.5 + 0.37 fits.
    assert not any(isinstance(d, Reject) for d in arrive(measured, "loose", 40.0, 9728, 10.0))
    # The measured price still refuses what does not fit it.
    (too_long,) = arrive(measured, "longer", 40.0, 9984, 10.0)
    assert f"and {rate * 8 / 2 * 0.5:.3f}s kept for tighter SLO classes" in too_long.reason


def test_a_unit_s_compute_is_shared_among_its_members_by_predicted_prefill():
    """One unit of a tight (256 tokens) and a loose (768 tokens) member predicted at 1 s that
    took 0.5 s: each class is charged half its prediction."""
    p = policy(admission=reserving("measured"))
    # 4 s due at 4 s: no slack, so nothing preempts it.
    assert arrive(p, "busy", 0.0, 4096, 4.0) == [run(1, "w0", ("busy", 0, 4096))]
    assert arrive(p, "tight", 0.1, 256, 20.0) == []
    assert arrive(p, "loose", 0.2, 768, 40.0) == []
    # When it is done, the two queued requests run as one unit.
    assert p.on_event(UnitCompleted("w0", 1, 4.0), 4.0) == [
        run(2, "w0", ("tight", 0, 256), ("loose", 0, 768))
    ]
    assert p.on_event(UnitCompleted("w0", 2, 0.5), 4.5) == []
    rates = p.admission.arrivals
    assert rates.cost_ratio(20.0) == pytest.approx(0.5)
    assert rates.cost_ratio(40.0) == pytest.approx(0.5)


def test_cost_ratio_follows_recent_work_and_is_one_before_any():
    rates = ArrivalRates(window_s=10.0)
    assert rates.cost_ratio(6.0) == 1.0
    rates.observe_cost(6.0, 0.5, 1.0, 0.0)
    assert rates.cost_ratio(6.0) == pytest.approx(0.5)
    assert rates.cost_ratio(23.2) == 1.0  # another target is priced on its own
    # One window later the old observation weighs 1/e of a fresh one of the same size.
    rates.observe_cost(6.0, 1.0, 1.0, 10.0)
    weight = math.exp(-1.0)
    assert rates.cost_ratio(6.0) == pytest.approx((0.5 * weight + 1.0) / (weight + 1.0))
    # The expected tight work is priced at that ratio only when asked.
    rates.add(6.0, 2.0, 10.0)
    plain = rates.expected_tighter_s(16.0, 10.0)
    assert rates.expected_tighter_s(16.0, 10.0, measured=True) == pytest.approx(
        plain * rates.cost_ratio(6.0)
    )


def test_a_bad_reserve_cost_names_the_field():
    with pytest.raises(ValueError, match="reserve_cost"):
        AdmissionConfig(reserve_cost="batched")


def test_a_reserve_factor_out_of_range_names_the_field():
    for bad in (0.0, -1.0, 11.0):
        with pytest.raises(ValueError, match="reserve_factor"):
            AdmissionConfig(reserve_factor=bad)
