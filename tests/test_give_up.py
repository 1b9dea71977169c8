"""Giving up on late requests (scheduling/give_up.py): the policy by hand, then the simulator.

The policy tests use the exact linear predictor of policy_helpers (1024 tokens = 1 s) on one
worker. The live runtime's side (a given-up request ends in RequestRejectedError, a bystander
is served) is in tests/test_admission_runtime.py, which has an engine for such cases.
"""

from __future__ import annotations

import pytest
from policy_helpers import arrive, policy, run

from flowprefill_ray.scheduling.config import PolicyConfig
from flowprefill_ray.scheduling.events import (
    Discard,
    Preempt,
    Reject,
    Resume,
    UnitCompleted,
    UnitPaused,
)
from flowprefill_ray.scheduling.request import RequestStatus
from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.simulator.engine import SimulatorConfig
from flowprefill_ray.simulator.experiment import simulate
from flowprefill_ray.simulator.measured import MeasuredCostModel
from flowprefill_ray.workloads import SLOAssignmentConfig, assign_slo_classes, load_builtin


def _late_request_behind_a_long_one(factor):
    """``long`` (4 s) runs from 0; ``late`` (0.125 s of work, 0.1 s target) arrives at 0.1,
    already unable to make it, so it waits; its give-up time is ``0.2 + factor x 0.1``."""
    p = policy(late_give_up_factor=factor)
    assert arrive(p, "long", 0.0, 4096, 100.0) == [run(1, "w0", ("long", 0, 4096))]
    assert arrive(p, "late", 0.1, 128, 0.1) == []  # infeasible: preempting would not save it
    return p


def test_a_waiting_late_request_is_refused_at_the_first_event_past_its_give_up_time():
    p = _late_request_behind_a_long_one(1.0)
    assert p.give_up_s(p.requests["late"]) == pytest.approx(0.3)
    assert arrive(p, "loose", 0.25, 1024, 100.0) == []  # before 0.3: still waiting
    out = arrive(p, "other", 0.35, 1024, 100.0)
    assert len(out) == 1 and isinstance(out[0], Reject) and out[0].request_id == "late"
    assert "gave up after 0.2 s" in out[0].reason and "late_give_up_factor" in out[0].reason
    assert out[0].retry_after_s == 1.0  # the admission config's hint
    assert p.request_view("late").status is RequestStatus.REJECTED
    stats = p.stats()
    assert (stats["given_up"], stats["rejects"]) == (1, 1)
    # The worker then runs the others; the refused request never runs.
    [started] = p.on_event(UnitCompleted("w0", 1, 4.0), 4.0)
    assert "late" not in started.unit.request_ids


def test_without_a_factor_the_late_request_waits_and_is_served():
    p = _late_request_behind_a_long_one(None)
    assert p.give_up_s(p.requests["late"]) is None
    assert arrive(p, "other", 0.35, 1024, 100.0) == []
    [started] = p.on_event(UnitCompleted("w0", 1, 4.0), 4.0)
    assert "late" in started.unit.request_ids  # late for 3.9 s and still served
    assert p.stats()["given_up"] == 0


def test_a_paused_unit_whose_members_are_all_past_giving_up_is_discarded():
    p = policy(late_give_up_factor=0.5)
    assert arrive(p, "a", 0.0, 2048, 3.0) == [run(1, "w0", ("a", 0, 2048))]  # due 3
    # urgent (2 s of work, due 2.7) would miss behind a's 1.5 s left: preempts it.
    assert arrive(p, "urgent", 0.5, 2048, 2.2) == [
        Preempt("w0", 1),
        run(2, "w0", ("urgent", 0, 2048)),
    ]
    assert p.on_event(UnitPaused("w0", 1, 0.5), 0.5) == []
    assert arrive(p, "c", 2.4, 2048, 10.0) == []  # feasible, due 12.4
    # At 2.5 a (1.5 s left, due 3) is late: c, still feasible, runs first.
    assert p.on_event(UnitCompleted("w0", 2, 2.0), 2.5) == [run(3, "w0", ("c", 0, 2048))]
    # a gives up at 3 + 0.5 x 3 = 4.5: refused, and its paused unit freed.
    out = p.on_event(UnitCompleted("w0", 3, 2.0), 4.5)
    assert [type(d) for d in out] == [Reject, Discard]
    assert out[0].request_id == "a" and out[1] == Discard("w0", 1)
    assert p.request_view("a").status is RequestStatus.REJECTED
    assert p.workers["w0"].paused == {} and 1 not in p.units


def test_a_late_member_waits_with_a_unit_neighbour_that_still_has_time():
    p = policy(late_give_up_factor=0.5)
    # x is due at 1.05: nobody may preempt it (it would miss).
    assert arrive(p, "x", 0.0, 1024, 1.05) == [run(1, "w0", ("x", 0, 1024))]
    assert arrive(p, "a", 0.1, 512, 3.0) == []  # due 3.1
    assert arrive(p, "b", 0.2, 512, 30.0) == []  # due 30.2
    # a heads the next unit and b joins it (1 s together; a keeps far more than 0.1 x 3 s).
    assert p.on_event(UnitCompleted("w0", 1, 1.0), 1.0) == [
        run(2, "w0", ("a", 0, 512), ("b", 0, 512))
    ]
    # u (1.5 s, due 2.9) would miss behind the unit's 0.8 s left: preempts it at 1.2.
    assert arrive(p, "u", 1.2, 1536, 1.7) == [Preempt("w0", 2), run(3, "w0", ("u", 0, 1536))]
    assert p.on_event(UnitPaused("w0", 2, 0.2), 1.2) == []
    assert arrive(p, "c", 2.6, 2048, 20.0) == []  # due 22.6
    # At 2.7 a is late, so the unit ranks by b (due 30.2): c (due 22.6) runs first.
    assert p.on_event(UnitCompleted("w0", 3, 1.5), 2.7) == [run(4, "w0", ("c", 0, 2048))]
    # At 4.7 a is past its give-up time (4.6) but b is not (45.2): the unit resumes whole.
    assert p.on_event(UnitCompleted("w0", 4, 2.0), 4.7) == [Resume("w0", 2)]
    assert p.request_view("a").status is RequestStatus.RUNNING
    assert p.stats()["given_up"] == 0


def test_the_simulator_carries_out_give_ups_and_goodput_does_not_drop():
    """The Azure conversation trace at a load that makes requests late, with and without the
    give-up: the same policy object in the simulator, refusals instead of unbounded waits."""
    requests = assign_slo_classes(
        load_builtin("azure_2023_conv").head(400), SLOAssignmentConfig(seed=1)
    ).scale_rate(8.0)
    cost, slo = MeasuredCostModel(), SLOConfig(scale=4.0)

    def run_with(factor):
        config = PolicyConfig(name="flowprefill", late_give_up_factor=factor)
        return simulate(requests, config, cost, slo, SimulatorConfig(num_workers=1))

    paper, bounded = run_with(None), run_with(1.0)
    assert not any(o.rejected for o in paper.outcomes)
    given_up = [o for o in bounded.outcomes if o.rejected]
    assert given_up, "the load should leave some requests far past their deadlines"
    for o in bounded.outcomes:
        assert o.rejected or o.prefill_completions == 1

    def met(result):
        return sum(1 for o in result.outcomes if o.finished and o.ttft_s <= o.ttft_slo_s)

    assert met(bounded) >= met(paper)
    worst = max(o.ttft_s / o.ttft_slo_s for o in paper.outcomes)
    bounded_worst = max(o.ttft_s / o.ttft_slo_s for o in bounded.outcomes if o.finished)
    assert bounded_worst < worst
