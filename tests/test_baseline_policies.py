"""The issue-14 baselines (srpf, priority_chunked, edf_giveup) and FlowPrefill's ablation knobs
(``preemption``, ``batching``), on hand-driven cases with exact expected decisions.

Predictor: 2**-10 s per token (policy_helpers.py), so 1024 tokens take exactly 1 s.
"""

from __future__ import annotations

from policy_helpers import arrive, policy, run

from flowprefill_ray.scheduling import RequestStatus
from flowprefill_ray.scheduling.events import Preempt, UnitCompleted, WorkerJoined

# --------------------------------------------------------------------------- srpf


def test_srpf_serves_the_least_remaining_work_first_whatever_the_deadlines():
    p = policy("srpf", chunk_size=512)
    assert arrive(p, "long", 0.0, 2048, 60.0) == [run(1, "w0", ("long", 0, 512))]
    assert arrive(p, "medium", 0.1, 1024, 0.25) == []  # the most urgent
    assert arrive(p, "short", 0.2, 128, 60.0) == []  # the least work
    # short (128 left), then medium (1024) before long (1536 left), whatever the deadlines.
    assert p.on_event(UnitCompleted("w0", 1, 0.5), 0.5) == [
        run(2, "w0", ("short", 0, 128), ("medium", 0, 384))
    ]
    assert p.on_event(UnitCompleted("w0", 2, 0.5), 1.0) == [run(3, "w0", ("medium", 384, 896))]
    # A newcomer with more left than long's 1536 waits behind long's tail.
    assert arrive(p, "big", 1.1, 1600, 0.5) == []
    assert p.on_event(UnitCompleted("w0", 3, 0.5), 1.5) == [
        run(4, "w0", ("medium", 896, 1024), ("long", 512, 896))
    ]
    assert p.on_event(UnitCompleted("w0", 4, 0.5), 2.0) == [run(5, "w0", ("long", 896, 1408))]


# --------------------------------------------------------------------------- priority_chunked


def test_priority_chunked_serves_the_tighter_class_first_then_arrival_order():
    def first_chunk_after(name: str, **config):
        p = policy(name, chunk_size=512, **config)
        arrive(p, "long", 0.0, 2048, 60.0)
        arrive(p, "relaxed", 0.1, 256, 1.0)  # due at 1.1
        arrive(p, "urgent-late", 0.4, 128, 0.9)  # tighter class, due later: 1.3
        arrive(p, "urgent-early", 0.3, 128, 0.9)  # same class, came first: 1.2
        return p.on_event(UnitCompleted("w0", 1, 0.5), 0.5)

    assert first_chunk_after("priority_chunked") == [
        run(2, "w0", ("urgent-early", 0, 128), ("urgent-late", 0, 128), ("relaxed", 0, 256))
    ]
    # EDF's order for the same arrivals: the relaxed request is due first.
    assert first_chunk_after("chunked", chunk_order="edf") == [
        run(2, "w0", ("relaxed", 0, 256), ("urgent-early", 0, 128), ("urgent-late", 0, 128))
    ]


def test_priority_chunked_lets_a_tighter_class_take_the_chunk_from_a_partial_request():
    p = policy("priority_chunked", chunk_size=512)
    assert arrive(p, "file", 0.0, 1024, 6.0) == [run(1, "w0", ("file", 0, 512))]
    assert arrive(p, "text", 0.2, 600, 0.25) == []
    assert p.on_event(UnitCompleted("w0", 1, 0.5), 0.5) == [run(2, "w0", ("text", 0, 512))]
    assert p.on_event(UnitCompleted("w0", 2, 0.5), 1.0) == [
        run(3, "w0", ("text", 512, 600), ("file", 512, 936))
    ]


# --------------------------------------------------------------------------- edf_giveup


def test_edf_giveup_serves_hopeless_requests_only_when_nothing_feasible_waits():
    def first_chunk_after(name: str):
        p = policy(name, chunk_size=512, chunk_order="edf")
        arrive(p, "long", 0.0, 2048, 60.0)
        # 1 s of work due in 0.5 s: hopeless on arrival.
        arrive(p, "doomed", 0.1, 1024, 0.5)
        arrive(p, "ok", 0.2, 256, 2.0)  # due at 2.2, feasible
        return p, p.on_event(UnitCompleted("w0", 1, 0.5), 0.5)

    p, decisions = first_chunk_after("edf_giveup")
    # The feasible ones by deadline (ok, then long's tail), the hopeless one after them.
    assert decisions == [run(2, "w0", ("ok", 0, 256), ("long", 512, 768))]
    assert p.on_event(UnitCompleted("w0", 2, 0.5), 1.0) == [run(3, "w0", ("long", 768, 1280))]
    assert p.on_event(UnitCompleted("w0", 3, 0.5), 1.5) == [run(4, "w0", ("long", 1280, 1792))]
    # Nothing feasible is left but long's last 256 tokens: the hopeless one fills the budget.
    assert p.on_event(UnitCompleted("w0", 4, 0.5), 2.0) == [
        run(5, "w0", ("long", 1792, 2048), ("doomed", 0, 256))
    ]
    # Plain chunked EDF keeps the hopeless request first: it is due soonest.
    _, decisions = first_chunk_after("chunked")
    assert decisions == [run(2, "w0", ("doomed", 0, 512))]


def test_edf_giveup_demotes_a_request_between_chunks_once_it_cannot_make_it():
    p = policy("edf_giveup", chunk_size=512)
    assert arrive(p, "a", 0.0, 1024, 1.2) == [run(1, "w0", ("a", 0, 512))]
    assert arrive(p, "b", 0.9, 256, 3.0) == []
    # The chunk overran (done at 1.0): a's 512 tokens left need 0.5 s, due at 1.2: hopeless.
    assert p.on_event(UnitCompleted("w0", 1, 1.0), 1.0) == [
        run(2, "w0", ("b", 0, 256), ("a", 512, 768))
    ]
    # Plain chunked EDF: a is due first, late or not.
    q = policy("chunked", chunk_size=512, chunk_order="edf")
    arrive(q, "a", 0.0, 1024, 1.2)
    arrive(q, "b", 0.9, 256, 3.0)
    assert q.on_event(UnitCompleted("w0", 1, 1.0), 1.0) == [run(2, "w0", ("a", 512, 1024))]


# --------------------------------------------------------------------------- flowprefill knobs


def test_without_preemption_flowprefill_lets_the_running_unit_finish():
    p = policy("flowprefill", preemption=False)
    assert arrive(p, "long", 0.0, 4096, 6.0) == [run(1, "w0", ("long", 0, 4096))]
    assert arrive(p, "short", 0.5, 128, 0.25) == []
    q = policy("flowprefill")  # the same arrivals with preemption on
    arrive(q, "long", 0.0, 4096, 6.0)
    assert arrive(q, "short", 0.5, 128, 0.25) == [
        Preempt("w0", 1),
        run(2, "w0", ("short", 0, 128)),  # one-hop handover: the replacement goes with it
    ]
    assert p.on_event(UnitCompleted("w0", 1, 4.0), 4.0) == [run(2, "w0", ("short", 0, 128))]
    assert p.request_view("long").status is RequestStatus.FINISHED
    assert p.stats()["preemptions"] == 0


def batch_of(batching: str) -> list[str]:
    """Request ids in the first unit when a worker joins; alpha 0.25, head SLO 1 s, so
    SLO-aware batching stops at 768 tokens (the head keeps 0.25 s)."""
    p = policy(workers=0, alpha=0.25, batching=batching)
    arrive(p, "head", 0.0, 256, 1.0)
    arrive(p, "to-768", 0.0, 512, 2.0)
    arrive(p, "one-more", 0.0, 1, 3.0)
    arrive(p, "too-big", 0.0, 2000, 3.5)  # over the 2048-token bound with the others
    arrive(p, "last", 0.0, 24, 4.0)
    (decision,) = p.on_event(WorkerJoined("w0"), 0.0)
    return [item.request_id for item in decision.unit.items]


def test_batching_knob_slo_token_bound_and_off():
    assert batch_of("slo") == ["head", "to-768"]
    # No alpha check: packed in priority order up to the token bound.
    assert batch_of("token_bound") == ["head", "to-768", "one-more", "last"]
    assert batch_of("off") == ["head"]
