"""``admission.overtake_looser``: a tight-class arrival admitted ahead of looser waiting work.

Hand-driven policies use the linear predictor of ``policy_helpers`` (1024 tokens take exactly
1 s); the end-to-end case runs the simulator with a timeline and asks why the demoted request
was late.
"""

from __future__ import annotations

import pytest
from policy_helpers import arrive, policy, run
from test_timeline import req

from flowprefill_ray.scheduling import (
    AdmissionConfig,
    PolicyConfig,
    RequestStatus,
    SLOConfig,
    make_policy,
)
from flowprefill_ray.scheduling.events import Overtaken, Reject, UnitCompleted
from flowprefill_ray.scheduling.slo import SLOClass
from flowprefill_ray.scheduling.timeline import Timeline
from flowprefill_ray.scheduling.why_late import why_late
from flowprefill_ray.simulator.engine import Simulator
from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy
from flowprefill_ray.simulator.overload import linear_cost_model

TWO = SLOConfig(
    classes=[
        SLOClass(name="urgent", ttft_slo_s=2.0, tpot_slo_s=0.5),
        SLOClass(name="relaxed", ttft_slo_s=8.0, tpot_slo_s=0.5),
    ],
    default_class="urgent",
)


def admission(overtake: bool, overtaken: str = "demote") -> AdmissionConfig:
    return AdmissionConfig(
        action="reject", estimate="queue", overtake_looser=overtake, overtaken=overtaken
    )


def relaxed_waiting_behind_a_long_unit(overtake: bool, overtaken: str = "demote"):
    """w0 runs 7 s of work due at 7.5 s; a 1 s relaxed request due at 8 s waits behind it;
    at 6 s an urgent 1 s request due at 8 s finds 1 + 1 s of work due no later ahead."""
    p = policy(slo=TWO, admission=admission(overtake, overtaken))
    assert arrive(p, "long", 0.0, 7168, 7.5, "relaxed") == [run(1, "w0", ("long", 0, 7168))]
    assert arrive(p, "r1", 0.0, 1024, 8.0, "relaxed") == []  # 7 + 1 <= 8
    return p, arrive(p, "u", 6.0, 1024, 2.0, "urgent")


def test_an_urgent_arrival_refused_for_looser_work_overtakes_it():
    p, refused = relaxed_waiting_behind_a_long_unit(overtake=False)
    assert isinstance(refused[0], Reject)  # 6 + 1 (long) + 1 (r1) + 1 > 8
    p, decisions = relaxed_waiting_behind_a_long_unit(overtake=True)
    # Its own tier has only the running unit ahead: 6 + 1 + 1 <= 8. r1 is demoted: out of
    # the admission index, late in the queue, its deadline (by which it is judged) kept.
    assert decisions == [Overtaken("r1", "u")]
    assert "r1" not in p.waiting_work and p.requests["r1"].deadline_s == 8.0
    assert p.counters["overtaken"] == 1 and p.waiting == 2
    # The worker frees at 7 s: u runs first (done at 8 s), then r1 (which now misses 8 s).
    assert p.on_event(UnitCompleted("w0", 1, 7.0), 7.0) == [run(2, "w0", ("u", 0, 1024))]
    assert p.on_event(UnitCompleted("w0", 2, 1.0), 8.0) == [run(3, "w0", ("r1", 0, 1024))]


def test_an_overtaken_request_can_be_refused_at_once_instead():
    p, decisions = relaxed_waiting_behind_a_long_unit(overtake=True, overtaken="refuse")
    overtaken, refused = decisions
    assert overtaken == Overtaken("r1", "u")
    assert isinstance(refused, Reject) and refused.request_id == "r1"
    assert refused.reason.startswith("refused 6.0 s after arrival: a request with a tighter")
    assert "admission.overtaken = refuse" in refused.reason
    assert p.requests["r1"].status is RequestStatus.REJECTED
    assert "r1" not in p.waiting_work and p.waiting == 1
    assert p.counters["overtaken"] == 1 and p.counters["rejects"] == 1
    # Only u is left to serve once the worker frees; then the worker goes idle.
    assert p.on_event(UnitCompleted("w0", 1, 7.0), 7.0) == [run(2, "w0", ("u", 0, 1024))]
    assert p.on_event(UnitCompleted("w0", 2, 1.0), 8.0) == []


def test_only_enough_looser_work_is_demoted_largest_first():
    p = policy(slo=TWO, admission=admission(True))
    arrive(p, "long", 0.0, 7168, 7.5, "relaxed")
    for rid, tokens in (("r1", 512), ("r2", 256), ("r3", 256)):
        assert arrive(p, rid, 0.0, tokens, 8.0, "relaxed") == []  # all due at 8 s
    # 6 + 1 + 1 + 0.75 = 8.75 > 8: 0.75 s must go. r1 (0.5 s), then of the two equal ones
    # the last queued (r3) cover it; r2 keeps its place.
    decisions = arrive(p, "u", 6.0, 768, 2.0, "urgent")
    assert decisions == [Overtaken("r1", "u"), Overtaken("r3", "u")]
    assert "r2" in p.waiting_work and not p.requests["r2"].overtaken
    # Served: r2 and u (feasible, both due at 8 s: r2 queued first; u still ends by 8 s),
    # then the demoted ones.
    order = [rec.request_id for rec in p.queue.in_order(6.0)]
    assert order[:2] == ["r2", "u"] and sorted(order[2:]) == ["r1", "r3"]


def test_an_arrival_that_would_overtake_more_than_max_overtaken_is_refused_instead():
    def three_relaxed_waiting(cap: int | None):
        adm = admission(True).model_copy(update={"max_overtaken": cap})
        p = policy(slo=TWO, admission=adm)
        arrive(p, "long", 0.0, 7168, 7.5, "relaxed")
        for rid, tokens in (("r1", 512), ("r2", 256), ("r3", 256)):
            arrive(p, rid, 0.0, tokens, 8.0, "relaxed")
        return p, arrive(p, "u", 6.0, 768, 2.0, "urgent")

    # Making room takes two demotions (as above): more than one, so the arrival is refused
    # and every relaxed request keeps its place.
    p, (refused,) = three_relaxed_waiting(cap=1)
    assert isinstance(refused, Reject) and refused.request_id == "u"
    assert "push 2 requests of looser classes" in refused.reason
    assert "admission.max_overtaken = 1" in refused.reason
    assert p.counters["overtakes_capped"] == 1 and p.counters["overtaken"] == 0
    assert p.requests["u"].status is RequestStatus.REJECTED and p.waiting == 3
    assert not any(p.requests[r].overtaken for r in ("r1", "r2", "r3"))
    # Two are allowed: it overtakes exactly as with no limit.
    p, decisions = three_relaxed_waiting(cap=2)
    assert decisions == [Overtaken("r1", "u"), Overtaken("r3", "u")]
    assert p.counters["overtakes_capped"] == 0


def test_the_loosest_class_and_explicit_targets_never_overtake():
    p, _ = relaxed_waiting_behind_a_long_unit(overtake=True)
    # A relaxed request refused for the work ahead has no looser class to pass.
    (refused,) = arrive(p, "late-relaxed", 6.0, 7168, 8.0, "relaxed")
    assert isinstance(refused, Reject)
    q = policy(slo=TWO, admission=admission(True))
    arrive(q, "long", 0.0, 7168, 7.5, "relaxed")
    arrive(q, "r1", 0.0, 1024, 8.0, "relaxed")
    # An explicit 2.5 s target is no class's: refused (6 + 2 + 1 > 8.5), as without overtaking.
    (explicit,) = arrive(q, "x", 6.0, 1024, 2.5, "urgent")
    assert isinstance(explicit, Reject)


@pytest.mark.parametrize("name", ["edf", "fcfs"])
def test_policies_that_cannot_re_rank_refuse_as_before(name):
    p = policy(name, slo=TWO, admission=admission(True))
    arrive(p, "long", 0.0, 7168, 7.5, "relaxed")
    arrive(p, "r1", 0.0, 1024, 8.0, "relaxed")
    (refused,) = arrive(p, "u", 6.0, 1024, 2.0, "urgent")
    assert isinstance(refused, Reject)
    assert p.tier_work == {}


def test_the_timeline_says_the_demoted_request_was_overtaken():
    cost = linear_cost_model()  # 4e-4 s per token: 2500 tokens take 1 s
    p = make_policy(
        PolicyConfig(online_correction=False, admission=admission(True)),
        fresh_copy(fit_predictor(cost)),
    )
    timeline = Timeline.for_policy(p)
    # long (4 s, due 5 s) runs; r1 (1 s, file class, due 6 s) waits; at 2.5 s a 2 s search
    # request due at 6.5 s finds 1.5 + 1 s ahead (6 + 2 > 6.5) but fits its own tier.
    requests = [
        req("long", 0.0, 10_000, 5.0, "file"),
        req("r1", 0.0, 2500, 6.0, "file"),
        req("u", 2.5, 5000, 4.0, "search"),
    ]
    result = Simulator(p, cost, timeline=timeline).run(requests)
    met = {o.request_id: o.met_slo for o in result.outcomes}
    assert met == {"long": True, "u": True, "r1": False}
    (verdict,) = why_late(timeline.export(None))
    assert (verdict["request_id"], verdict["cause"]) == ("r1", "overtaken_by_tighter")
    exported = {r["request_id"]: r for r in timeline.export(None)["requests"]}
    assert exported["r1"]["overtaken"] == [{"at_s": 2.5, "by": "u"}]


def test_a_demoted_request_stays_late_when_the_correction_falls():
    p, _ = relaxed_waiting_behind_a_long_unit(overtake=True)
    # Predictions halve: every late request whose deadline is ahead is re-scored, and r1
    # (1 s, due at 8 s) would be feasible again, ahead of u by deadline. It stays demoted.
    p.predictor.correction = 0.5
    order = [rec.request_id for rec in p.queue.in_order(6.0)]
    assert p.queue.rescores == 1
    assert order == ["u", "r1"] and p.requests["r1"].queue_late
