"""Scheduling policies on constructed cases with exact expected decisions.

The predictor is linear at 2**-10 s per token (about 1 ms) so that every time below is an
exact binary fraction and the bounds are tested exactly.
"""

from __future__ import annotations

import random

import pytest
from policy_helpers import SPT, arrive, linear_predictor, policy, run

from flowprefill_ray.scheduling import (
    AdmissionConfig,
    DuplicateArrivalError,
    FlowPrefillPolicy,
    KVBudget,
    PolicyConfig,
    PredictorConfig,
    Request,
    RequestStatus,
    TTFTPredictor,
    make_policy,
    priority,
    rank_key,
    slack_s,
)
from flowprefill_ray.scheduling.events import (
    Arrival,
    Cancelled,
    Discard,
    Preempt,
    Reject,
    Resume,
    RunUnit,
    UnitCompleted,
    UnitPaused,
    WorkerJoined,
    WorkerLeft,
    WorkUnit,
)

# --------------------------------------------------------------------------- priority rule


def test_priority_is_sign_of_slack_over_deadline_with_sign_zero_positive():
    assert slack_s(deadline_s=10.0, now_s=4.0, predicted_s=3.0, executed_s=1.0) == 4.0
    assert slack_s(deadline_s=10.0, now_s=4.0, predicted_s=3.0, executed_s=5.0) == 6.0  # done
    assert priority(0.0, 8.0) == 1 / 8.0  # exactly feasible counts as feasible
    assert priority(-0.5, 8.0) == -1 / 8.0
    # Feasible earliest-deadline-first, then late ones latest-deadline-first.
    cases = [(1.0, 5.0), (0.0, 9.0), (-1.0, 3.0), (-1.0, 7.0), (2.0, 2.0)]
    by_priority = sorted(cases, key=lambda c: -priority(*c))
    by_rank = sorted(cases, key=lambda c: rank_key(*c))
    assert by_priority == by_rank == [(2.0, 2.0), (1.0, 5.0), (0.0, 9.0), (-1.0, 7.0), (-1.0, 3.0)]


def test_late_requests_queue_after_feasible_ones_latest_deadline_first():
    p = policy(handover="after_pause")  # the first arrival's preemption leaves it queued
    arrive(p, "busy", 0.0, 8192, 100.0)  # occupies the worker
    arrive(p, "ok-late-deadline", 0.0, 1024, 8.0)  # needs 1 s, deadline 8: feasible
    arrive(p, "ok-early-deadline", 0.0, 1024, 4.0)  # feasible, earlier deadline
    arrive(p, "late-a", 0.0, 4096, 2.0)  # needs 4 s, deadline 2: late
    arrive(p, "late-b", 0.0, 4096, 3.0)  # late, later deadline -> ahead of late-a
    assert p.waiting_in_priority_order(0.0) == [
        "ok-early-deadline",
        "ok-late-deadline",
        "late-b",
        "late-a",
    ]
    # At t=3.5 the early-deadline one (needs 1 s, due at 4) has turned late too.
    assert p.waiting_in_priority_order(3.5) == [
        "ok-late-deadline",
        "ok-early-deadline",
        "late-b",
        "late-a",
    ]


def test_lazy_queue_matches_a_full_rescan():
    rng = random.Random(7)
    # after_pause: the worker stays pausing, so every arrival stays in the queue under test.
    p = policy(rescore_threshold=0.0, handover="after_pause")
    arrive(p, "busy", 0.0, 16384, 1e6)
    brute: dict[str, tuple[float, int, int]] = {}  # id -> (deadline, tokens, arrival order)
    now = 0.0
    for step in range(600):
        now += rng.expovariate(200.0)
        action = rng.random()
        if action < 0.75 or not brute:
            rid = f"r{step}"
            tokens = rng.randint(1, 6000)
            slo = rng.choice([0.25, 0.5, 4.0, 6.0])
            arrive(p, rid, now, tokens, slo)
            brute[rid] = (now + slo, tokens, step)
        elif action < 0.85:
            rid = rng.choice(sorted(brute))
            p.on_event(Cancelled(rid), now)
            del brute[rid]
        else:
            # Move the online correction both ways: falling makes late requests feasible again.
            p.predictor.correction = rng.choice([0.5, 0.8, 1.0, 1.3])
        if step % 25 == 0:
            expected = sorted(
                brute,
                key=lambda r: (
                    rank_key(
                        slack_s(brute[r][0], now, p.predictor.predict(brute[r][1])), brute[r][0]
                    ),
                    brute[r][2],
                ),
            )
            assert p.waiting_in_priority_order(now) == expected


# --------------------------------------------------------------------------- preemption


def test_urgent_short_request_preempts_long_relaxed_prefill_then_long_resumes():
    p = policy("flowprefill")
    assert arrive(p, "long", 0.0, 4096, 6.0) == [run(1, "w0", ("long", 0, 4096))]
    # One hop: the unit that replaces the victim goes with the preemption.
    assert arrive(p, "short", 0.5, 128, 0.25) == [
        Preempt("w0", 1),
        run(2, "w0", ("short", 0, 128)),
    ]
    assert p.request_view("long").status is RequestStatus.RUNNING  # until the worker answers
    assert p.request_view("short").status is RequestStatus.RUNNING  # committed to w0
    # The worker switched at its checkpoint on its own: the report only updates the books.
    assert p.on_event(UnitPaused("w0", 1, executed_s=0.5, blocking_s=0.002), 0.502) == []
    assert p.workers["w0"].running is p.units[2] and p.units[2].started_at_s == 0.502
    view = p.request_view("long")
    assert (view.status, view.worker_id) == (RequestStatus.PAUSED, "w0")
    assert p.on_event(UnitCompleted("w0", 2, executed_s=0.125), 0.627) == [Resume("w0", 1)]
    assert p.on_event(UnitCompleted("w0", 1, executed_s=4.0), 4.127) == []
    assert p.request_view("long").status is RequestStatus.FINISHED
    assert p.request_view("long").executed_s == 4.0
    stats = p.stats()
    assert (stats["preemptions"], stats["resumes"], stats["units_started"]) == (1, 1, 2)
    assert stats["blocking_s_total"] == 0.002
    assert (p.decisions.events, p.decisions.decisions) == (3, 4)


@pytest.mark.parametrize("victim_paused", [True, False])
def test_queued_units_report_overtaking_its_victims_leaves_the_worker_free(victim_paused):
    # Seen live (2.6 req/s on 2 busy cores, issue 14): the short replacement's "completed"
    # reached the scheduler before the victim's "paused"; the worker was then booked as running
    # the finished unit forever, and nothing ran again. Either victim report must free it.
    p = policy("flowprefill")
    arrive(p, "long", 0.0, 4096, 6.0)
    assert arrive(p, "short", 0.5, 128, 0.25) == [Preempt("w0", 1), run(2, "w0", ("short", 0, 128))]
    assert p.on_event(UnitCompleted("w0", 2, executed_s=0.125), 0.627) == []
    assert p.request_view("short").status is RequestStatus.FINISHED
    w = p.workers["w0"]
    assert (w.running, w.next) == (p.units[1], None)  # still stopping "long", nothing queued
    assert p.stats()["queued_reported_first"] == 1
    if victim_paused:
        assert p.on_event(UnitPaused("w0", 1, executed_s=0.5, blocking_s=0.1), 0.63) == [
            Resume("w0", 1)
        ]
        assert w.running is p.units[1]
        assert p.on_event(UnitCompleted("w0", 1, executed_s=4.0), 4.2) == []
    else:  # the preempt came too late: "long" completed before "short" started
        assert p.on_event(UnitCompleted("w0", 1, executed_s=4.0), 4.0) == []
    assert (w.running, w.next, w.paused) == (None, None, {})
    assert p.request_view("long").status is RequestStatus.FINISHED
    # The worker takes new work at once.
    assert arrive(p, "later", 5.0, 64, 1.0) == [run(3, "w0", ("later", 0, 64))]


def test_after_pause_handover_decides_the_next_unit_when_the_pause_is_reported():
    p = policy("flowprefill", handover="after_pause")
    arrive(p, "long", 0.0, 4096, 6.0)
    assert arrive(p, "short", 0.5, 128, 0.25) == [Preempt("w0", 1)]
    assert p.request_view("short").status is RequestStatus.WAITING
    assert p.on_event(UnitPaused("w0", 1, executed_s=0.5, blocking_s=0.002), 0.502) == [
        run(2, "w0", ("short", 0, 128))
    ]


def test_a_paused_batch_whose_urgent_member_is_late_still_resumes_for_its_other_members():
    # Seen live (SmolLM2, azure-conv at x3.6): a 2 s image request batched with 24 s file
    # requests was preempted, turned late while paused, and the whole unit then ranked as late,
    # below every feasible request: the file requests waited ~30 s for the queue to drain.
    p = policy(workers=0)
    arrive(p, "image", 0.0, 256, 2.0, cls="image")
    arrive(p, "file", 0.0, 256, 24.0, cls="file")
    assert p.on_event(WorkerJoined("w0"), 0.0) == [
        run(1, "w0", ("image", 0, 256), ("file", 0, 256))
    ]
    # 1.5 s of work due at 1.6 s cannot wait for the unit's remaining 0.4 s: it preempts.
    assert arrive(p, "urgent", 0.1, 1536, 1.5) == [
        Preempt("w0", 1),
        run(2, "w0", ("urgent", 0, 1536)),
    ]
    assert p.on_event(UnitPaused("w0", 1, executed_s=0.1, blocking_s=0.0), 0.1) == []
    assert arrive(p, "relaxed", 0.2, 512, 60.0) == []  # feasible, due at 60.2 s
    # The urgent unit overruns to 1.7 s: the image request (due 2.0, 0.4 s left) is now late,
    # the file request (due 24.0) is not, and it is due before the relaxed one.
    assert p.on_event(UnitCompleted("w0", 2, executed_s=1.6), 1.7) == [Resume("w0", 1)]
    assert p.unit_slack_s(p.units[1], 1.7) == pytest.approx(24.0 - 1.7 - 0.4)


def test_a_unit_is_due_at_its_earliest_deadline_it_can_still_make():
    p = policy(workers=0)
    arrive(p, "a", 0.0, 256, 1.0)
    arrive(p, "b", 0.0, 256, 5.0)
    p.on_event(WorkerJoined("w0"), 0.0)
    unit = p.units[1]
    assert unit.deadlines == (1.0, 5.0)
    assert unit.due_s(0.0, 0.5) == (True, 1.0)
    assert unit.due_s(0.75, 0.5) == (True, 5.0)  # "a" cannot make it any more, "b" can
    assert unit.due_s(4.75, 0.5) == (False, 5.0)  # neither: ranked by the latest deadline


def test_a_unit_that_completes_before_pausing_is_just_completed():
    p = policy("flowprefill")
    arrive(p, "long", 0.0, 4096, 6.0)
    assert arrive(p, "short", 0.5, 128, 0.25) == [
        Preempt("w0", 1),
        run(2, "w0", ("short", 0, 128)),
    ]
    # Finished before its checkpoint: the worker goes on to the unit sent with the preempt.
    assert p.on_event(UnitCompleted("w0", 1, executed_s=4.0), 4.0) == []
    assert p.request_view("long").status is RequestStatus.FINISHED
    assert p.workers["w0"].running is p.units[2]


@pytest.mark.parametrize("name", ["fcfs", "edf"])
def test_run_to_completion_policies_never_preempt(name):
    p = policy(name)
    assert arrive(p, "long", 0.0, 4096, 6.0) == [run(1, "w0", ("long", 0, 4096))]
    assert arrive(p, "relaxed", 0.1, 128, 60.0) == []
    assert arrive(p, "short", 0.5, 128, 0.25) == []
    first = ("relaxed", 0, 128) if name == "fcfs" else ("short", 0, 128)
    second = ("short", 0, 128) if name == "fcfs" else ("relaxed", 0, 128)
    # Both fit in one 2048-token unit, in queue order.
    assert p.on_event(UnitCompleted("w0", 1, 4.0), 4.0) == [run(2, "w0", first, second)]
    assert p.stats()["preemptions"] == 0


def test_chunked_edf_switches_to_urgent_work_at_the_next_chunk_boundary():
    p = policy("chunked", chunk_size=512, chunk_order="edf")
    assert arrive(p, "long", 0.0, 2048, 6.0) == [run(1, "w0", ("long", 0, 512))]
    assert arrive(p, "short", 0.2, 128, 0.25) == []  # no preemption inside a chunk
    # Next boundary: the urgent request first, the long one fills the rest of the budget.
    assert p.on_event(UnitCompleted("w0", 1, 0.5), 0.5) == [
        run(2, "w0", ("short", 0, 128), ("long", 512, 896))
    ]
    view = p.request_view("long")
    assert (view.status, view.prefilled_tokens) == (RequestStatus.RUNNING, 512)
    assert p.on_event(UnitCompleted("w0", 2, 0.5), 1.0) == [run(3, "w0", ("long", 896, 1408))]
    assert p.request_view("short").status is RequestStatus.FINISHED
    assert p.on_event(UnitCompleted("w0", 3, 0.5), 1.5) == [run(4, "w0", ("long", 1408, 1920))]
    assert p.on_event(UnitCompleted("w0", 4, 0.5), 2.0) == [run(5, "w0", ("long", 1920, 2048))]
    assert p.on_event(UnitCompleted("w0", 5, 0.1), 2.1) == []
    assert p.request_view("long").status is RequestStatus.FINISHED


def test_chunked_fcfs_keeps_the_earlier_request_first():
    p = policy("chunked", chunk_size=512, chunk_order="fcfs")
    arrive(p, "long", 0.0, 2048, 6.0)
    arrive(p, "short", 0.2, 128, 0.25)
    assert p.on_event(UnitCompleted("w0", 1, 0.5), 0.5) == [run(2, "w0", ("long", 512, 1024))]
    assert p.on_event(UnitCompleted("w0", 2, 0.5), 1.0) == [run(3, "w0", ("long", 1024, 1536))]
    assert p.on_event(UnitCompleted("w0", 3, 0.5), 1.5) == [
        run(4, "w0", ("long", 1536, 2048)),
    ]
    assert p.on_event(UnitCompleted("w0", 4, 0.5), 2.0) == [run(5, "w0", ("short", 0, 128))]


def test_chunked_partial_request_continues_only_on_the_worker_holding_its_kv():
    p = policy("chunked", workers=2, chunk_size=512, chunk_order="fcfs")
    assert arrive(p, "a", 0.0, 1024, 6.0) == [run(1, "w0", ("a", 0, 512))]
    assert arrive(p, "b", 0.1, 1024, 6.0) == [run(2, "w1", ("b", 0, 512))]
    # w1 finishes first; it may not take a's second chunk (a's KV is on w0).
    assert p.on_event(UnitCompleted("w1", 2, 0.4), 0.4) == [run(3, "w1", ("b", 512, 1024))]
    assert p.on_event(UnitCompleted("w0", 1, 0.5), 0.5) == [run(4, "w0", ("a", 512, 1024))]


# --------------------------------------------------------------------------- batching


def test_batching_fills_up_to_the_token_bound_and_skips_requests_that_do_not_fit():
    p = policy(workers=0)
    arrive(p, "head", 0.0, 1024, 6.0)
    arrive(p, "too-big-alone", 0.0, 2049, 6.5)
    arrive(p, "fits-exactly", 0.0, 1000, 7.0)
    arrive(p, "over-total", 0.0, 30, 7.5)  # 2024 + 30 > 2048
    arrive(p, "last-24", 0.0, 24, 8.0)  # brings the total to exactly 2048
    assert p.on_event(WorkerJoined("w0"), 0.0) == [
        run(1, "w0", ("head", 0, 1024), ("fits-exactly", 0, 1000), ("last-24", 0, 24))
    ]
    assert p.waiting_in_priority_order(0.0) == ["too-big-alone", "over-total"]


def test_batching_only_for_heads_within_the_token_bound():
    p = policy(workers=0)
    arrive(p, "head", 0.0, 2049, 6.0)
    arrive(p, "small", 0.0, 16, 7.0)
    assert p.on_event(WorkerJoined("w0"), 0.0) == [run(1, "w0", ("head", 0, 2049))]
    p = policy(workers=0)
    arrive(p, "head", 0.0, 2048, 6.0)  # exactly at the bound: batching allowed, but full
    arrive(p, "small", 0.0, 16, 7.0)
    assert p.on_event(WorkerJoined("w0"), 0.0) == [run(1, "w0", ("head", 0, 2048))]


def test_batching_stops_before_the_head_would_keep_less_than_alpha_slo():
    # Head SLO 1 s, alpha 0.25: the batch may take at most 0.75 s = 768 tokens.
    p = policy(workers=0, alpha=0.25)
    arrive(p, "head", 0.0, 256, 1.0)
    arrive(p, "to-768", 0.0, 512, 2.0)  # total 768: 1.0 - 0.75 = 0.25, not < 0.25: joins
    arrive(p, "one-more", 0.0, 1, 3.0)  # 769 tokens would leave < 0.25 s: the scan stops
    arrive(p, "after-stop", 0.0, 1, 4.0)  # never examined
    assert p.on_event(WorkerJoined("w0"), 0.0) == [
        run(1, "w0", ("head", 0, 256), ("to-768", 0, 512))
    ]
    assert p.waiting_in_priority_order(0.0) == ["one-more", "after-stop"]


def test_batching_prices_a_batch_at_the_recent_one_in_ten_overrun():
    """With online correction, a batch is priced at predict(tokens) x the 90th percentile of
    recent units' actual/predicted ratio, so a batch that overruns that much still leaves the
    head alpha x SLO; without the margin the same scan takes more members."""
    from policy_helpers import linear_predictor

    from flowprefill_ray.scheduling import make_policy

    def batch(margin: bool) -> list[str]:
        predictor = linear_predictor()
        # Units ran 0.9x..1.5x their prediction: the 90th percentile is ~1.44x.
        for i in range(20):
            predictor.observe(1024, (0.9 + 0.6 * i / 19) * predictor.predict(1024))
        assert predictor.overrun_ratio == pytest.approx(0.9 + 0.6 * 17 / 19)
        predictor.correction = 1.0  # keep the linear 1 s per 1024 tokens exact
        p = make_policy(PolicyConfig(alpha=0.25, batch_error_margin=margin), predictor, slo=None)
        arrive(p, "head", 0.0, 256, 1.0)
        arrive(p, "a", 0.0, 128, 2.0)
        arrive(p, "b", 0.0, 128, 3.0)
        arrive(p, "c", 0.0, 256, 4.0)
        (unit,) = p.on_event(WorkerJoined("w0"), 0.0)
        return [item.request_id for item in unit.unit.items]

    # Plain: 768 tokens = 0.75 s leave exactly 0.25 s; at 1.44x, 512 tokens (0.72 s) fit
    # and 768 (1.08 s) do not.
    assert batch(False) == ["head", "a", "b", "c"]
    assert batch(True) == ["head", "a", "b"]


def test_no_batching_when_head_has_less_than_alpha_slo_left():
    p = policy(workers=0, alpha=0.25)
    arrive(p, "head", 0.0, 16, 1.0)
    arrive(p, "small", 0.0, 16, 50.0)
    # At t = 0.8 only 0.2 s (< 0.25 x 1 s) is left before the head's deadline.
    assert p.on_event(WorkerJoined("w0"), 0.8) == [run(1, "w0", ("head", 0, 16))]


def test_batch_members_join_only_within_the_free_kv_bytes():
    # 10 bytes of KV and 2 of activations per token: head 1024 + small 64 tokens need
    # 13056 bytes, adding big (512) would need 19200 > 16000.
    budget = KVBudget(16_000, 8_000, kv_bytes_per_token=10, activation_bytes_per_token=2)
    p = make_policy(PolicyConfig(online_correction=False), linear_predictor())
    arrive(p, "head", 0.0, 1024, 6.0)
    arrive(p, "big", 0.0, 512, 7.0)
    arrive(p, "small", 0.0, 64, 8.0)
    assert p.on_event(WorkerJoined("w0", budget), 0.0) == [
        run(1, "w0", ("head", 0, 1024), ("small", 0, 64))
    ]
    assert p.stats()["kv_memory"]["w0"]["held_bytes"] == 1088 * 12


# --------------------------------------------------------------------------- many workers


def test_newcomer_takes_an_idle_worker_instead_of_preempting():
    p = policy(workers=2)
    assert arrive(p, "long", 0.0, 8192, 60.0) == [run(1, "w0", ("long", 0, 8192))]
    assert arrive(p, "urgent", 0.1, 128, 0.25) == [run(2, "w1", ("urgent", 0, 128))]


def test_newcomer_preempts_the_lowest_ranked_worker():
    p = policy(workers=2)
    arrive(p, "relaxed", 0.0, 4096, 30.0)  # deadline 30
    arrive(p, "more-relaxed", 0.0, 4096, 60.0)  # deadline 60: lowest rank
    assert arrive(p, "urgent", 0.5, 256, 0.5) == [
        Preempt("w1", 2),
        run(3, "w1", ("urgent", 0, 256)),
    ]
    # A second urgent request while w1 is still pausing: it takes w0, ranked lowest now.
    assert arrive(p, "urgent-2", 0.6, 256, 0.5) == [
        Preempt("w0", 1),
        run(4, "w0", ("urgent-2", 0, 256)),
    ]
    assert p.on_event(UnitPaused("w1", 2, 0.5), 0.61) == []
    assert p.on_event(UnitPaused("w0", 1, 0.6), 0.62) == []
    assert [p.workers[w].running.unit_id for w in ("w0", "w1")] == [4, 3]


def test_no_preemption_that_buys_nothing():
    p = policy(workers=2)
    arrive(p, "slow", 0.0, 2048, 2.25)  # w0: needs 2 s, due 2.25: 0.25 s of slack
    arrive(p, "quick", 0.0, 512, 2.0)  # w1: needs 0.5 s, due 2.0
    # Outranks nobody: its deadline is later than both running units'.
    assert arrive(p, "later", 0.0, 512, 9.0) == []
    # Outranks "slow" (due 2.125 < 2.25), but preempting would make "slow" miss (0.25 s of
    # slack < 0.5 s of work), and it can wait: w1 frees in 0.5 s and it has 1.625 s of slack.
    assert arrive(p, "newcomer", 0.0, 512, 2.125) == []
    assert p.stats()["preemptions"] == 0
    # When w1 frees, the newcomer goes first (earliest feasible deadline).
    assert p.on_event(UnitCompleted("w1", 2, 0.5), 0.5) == [
        run(3, "w1", ("newcomer", 0, 512), ("later", 0, 512))
    ]


def test_preemption_allowed_when_the_victim_keeps_its_slack():
    p = policy(workers=1)
    arrive(p, "relaxed", 0.0, 2048, 4.0)  # needs 2 s, 2 s of slack
    # Ranks above (due 3.5 < 4) and could wait, but the victim still makes it after 0.5 s more.
    assert arrive(p, "earlier", 1.5, 512, 2.0) == [
        Preempt("w0", 1),
        run(2, "w0", ("earlier", 0, 512)),
    ]


def test_late_newcomer_never_preempts():
    p = policy(workers=1)
    arrive(p, "running", 0.0, 4096, 5.0)
    # Needs 2 s, has 1 s: it is late whatever happens; preempting would only add a victim.
    assert arrive(p, "hopeless", 0.1, 2048, 1.0) == []


# --------------------------------------------------------------------------- failures, cancel


def test_worker_left_requeues_its_requests_with_progress_reset():
    p = policy(workers=2)
    arrive(p, "long", 0.0, 4096, 6.0)  # w0
    arrive(p, "other", 0.0, 4096, 7.0)  # w1
    assert arrive(p, "urgent", 0.5, 128, 0.25) == [  # w1: the lowest ranked
        Preempt("w1", 2),
        run(3, "w1", ("urgent", 0, 128)),
    ]
    assert p.on_event(UnitPaused("w1", 2, 0.5), 0.5) == []
    # w1 dies with urgent running and other paused on it. Both go back to the queue with
    # their progress reset and deadlines unchanged; urgent (due 0.75, needs 0.125 s) would
    # miss waiting for w0 (3.4 s left), so it preempts w0.
    assert p.on_event(WorkerLeft("w1"), 0.5625) == [
        Preempt("w0", 1),
        run(4, "w0", ("urgent", 0, 128)),
    ]
    view = p.request_view("other")
    assert (view.status, view.executed_s, view.worker_id) == (RequestStatus.WAITING, 0.0, None)
    view = p.request_view("urgent")  # re-queued, then sent to w0 with the preemption
    assert (view.status, view.executed_s, view.worker_id) == (RequestStatus.RUNNING, 0.0, "w0")
    assert p.request_view("urgent").deadline_s == 0.75
    assert p.stats()["requeued"] == 2
    # A late completion from the dead worker is ignored.
    assert p.on_event(UnitCompleted("w1", 3, 0.1), 0.5625) == []
    assert p.stats()["stale_events"] == 1
    assert p.on_event(UnitPaused("w0", 1, 0.5625), 0.5625) == []
    # Then w0's own paused unit (due 6) ranks above the re-queued "other" (due 7).
    assert p.on_event(UnitCompleted("w0", 4, 0.125), 0.6875) == [Resume("w0", 1)]


def test_cancel_waiting_request_never_runs():
    p = policy("fcfs")
    arrive(p, "a", 0.0, 1024, 6.0)
    arrive(p, "b", 0.1, 1024, 6.0)
    assert p.on_event(Cancelled("b"), 0.2) == []
    assert p.on_event(UnitCompleted("w0", 1, 1.0), 1.0) == []
    assert p.request_view("b").status is RequestStatus.CANCELLED


def test_cancel_paused_unit_discards_it_and_running_request_does_not_finish():
    p = policy()
    arrive(p, "long", 0.0, 4096, 6.0)
    arrive(p, "short", 0.5, 128, 0.25)
    p.on_event(UnitPaused("w0", 1, 0.5), 0.5)
    assert p.on_event(Cancelled("long"), 0.55) == [Discard("w0", 1)]
    assert p.on_event(Cancelled("short"), 0.56) == []  # running: its unit runs on
    assert p.on_event(UnitCompleted("w0", 2, 0.125), 0.625) == []  # nothing left to resume
    assert p.request_view("short").status is RequestStatus.CANCELLED
    assert p.stats()["discards"] == 1


def test_admission_control_rejects_requests_that_cannot_make_it():
    p = policy(admission=AdmissionConfig(action="reject", estimate="alone", retry_after_s=2.0))
    decisions = arrive(p, "too-long", 0.0, 1024, 0.5)  # needs 1 s, has 0.5 s
    assert len(decisions) == 1 and isinstance(decisions[0], Reject)
    assert decisions[0].request_id == "too-long" and decisions[0].retry_after_s == 2.0
    assert p.request_view("too-long").status is RequestStatus.REJECTED
    assert arrive(p, "fine", 0.0, 256, 0.5) == [run(1, "w0", ("fine", 0, 256))]


def test_duplicate_request_id_is_an_error():
    p = policy()
    arrive(p, "a", 0.0, 16, 1.0)
    with pytest.raises(DuplicateArrivalError, match="'a'"):
        arrive(p, "a", 0.1, 16, 1.0)


def test_online_correction_follows_completed_units():
    p = make_policy(PolicyConfig(online_correction=True), linear_predictor())
    assert isinstance(p, FlowPrefillPolicy)
    p.on_event(WorkerJoined("w0"), 0.0)
    arrive(p, "a", 0.0, 1024, 6.0)
    p.on_event(UnitCompleted("w0", 1, executed_s=2.0), 2.0)  # took 2x the prediction
    assert p.predictor.correction == pytest.approx(1.1)  # EWMA weight 0.1


def test_unknown_policy_name_is_rejected_by_the_config():
    with pytest.raises(ValueError, match="flowprefill"):
        PolicyConfig(name="lottery")


# --------------------------------------------------------------------------- random streams


class _Executor:
    """Carries out decisions like a cluster would and checks they are legal."""

    def __init__(self, p, rng: random.Random):
        self.p = p
        self.rng = rng
        self.running: dict[str, WorkUnit] = {}  # worker -> unit it executes
        self.paused: dict[int, WorkUnit] = {}
        self.preempting: set[str] = set()
        self.queued: dict[str, WorkUnit] = {}  # one-hop: sent with the preempt, runs next
        self.workers: set[str] = set()
        self.now = 0.0

    def send(self, event) -> None:
        for d in self.p.on_event(event, self.now):
            self.apply(d)

    def apply(self, d) -> None:
        if isinstance(d, RunUnit):
            w = d.unit.worker_id
            assert w in self.workers, f"{w} is gone"
            if w in self.running:  # only behind a unit told to pause, and only one
                assert w in self.preempting and w not in self.queued, f"{w} is not idle"
                self.queued[w] = d.unit
            else:
                self.running[w] = d.unit
        elif isinstance(d, Preempt):
            assert self.running[d.worker_id].unit_id == d.unit_id
            assert d.worker_id not in self.preempting, "preempted twice"
            self.preempting.add(d.worker_id)
        elif isinstance(d, Resume):
            unit = self.paused.pop(d.unit_id)
            assert unit.worker_id == d.worker_id and d.worker_id not in self.running
            self.running[d.worker_id] = unit
        elif isinstance(d, Discard):
            assert self.paused.pop(d.unit_id).worker_id == d.worker_id
        else:
            assert isinstance(d, Reject)

    def step(self, i: int) -> None:
        self.now += self.rng.expovariate(20.0)
        r = self.rng.random()
        if r < 0.45:
            slo = self.rng.choice([0.25, 0.5, 4.0, 6.0])
            arrive_req = Request(
                request_id=f"r{i}",
                arrival_s=self.now,
                prompt_tokens=self.rng.randint(1, 5000),
                ttft_slo_s=slo,
            )
            self.send(Arrival(arrive_req))
        elif r < 0.8 and self.running:
            w = self.rng.choice(sorted(self.running))
            unit = self.running.pop(w)
            if w in self.queued:  # the worker switches to it on its own
                self.running[w] = self.queued.pop(w)
            if w in self.preempting and self.rng.random() < 0.7:
                self.preempting.discard(w)
                self.paused[unit.unit_id] = unit
                self.send(UnitPaused(w, unit.unit_id, 0.01, 0.001))
            else:
                self.preempting.discard(w)
                self.send(UnitCompleted(w, unit.unit_id, unit.tokens * SPT))
        elif r < 0.88:
            live = [rid for rid, rec in self.p.requests.items() if not rec.status.is_terminal]
            if live:
                self.send(Cancelled(self.rng.choice(live)))
        elif r < 0.94 and len(self.workers) > 1:
            w = self.rng.choice(sorted(self.workers))
            self.workers.discard(w)
            self.running.pop(w, None)
            self.queued.pop(w, None)
            self.preempting.discard(w)
            self.paused = {k: u for k, u in self.paused.items() if u.worker_id != w}
            self.send(WorkerLeft(w))
        elif len(self.workers) < 4:
            w = f"w{i}"
            self.workers.add(w)
            self.send(WorkerJoined(w))

    def drain(self) -> None:
        for _ in range(10000):
            if not self.running:
                break
            w = sorted(self.running)[0]
            unit = self.running.pop(w)
            if w in self.queued:
                self.running[w] = self.queued.pop(w)
            self.preempting.discard(w)
            self.now += unit.tokens * SPT
            self.send(UnitCompleted(w, unit.unit_id, unit.tokens * SPT))


@pytest.mark.parametrize(
    "name", ["flowprefill", "fcfs", "edf", "chunked", "srpf", "priority_chunked", "edf_giveup"]
)
def test_random_event_streams_keep_every_decision_legal_and_finish_all_work(name):
    rng = random.Random(11)
    p = make_policy(PolicyConfig(name=name), linear_predictor())
    ex = _Executor(p, rng)
    ex.workers.add("w-first")
    ex.send(WorkerJoined("w-first"))
    for i in range(1500):
        ex.step(i)
        # The policy's view of each worker matches what the executor sees.
        for wid, w in p.workers.items():
            unit = w.running
            assert (unit.unit_id if unit else None) == (
                ex.running[wid].unit_id if wid in ex.running else None
            )
    ex.drain()
    statuses = {rec.status for rec in p.requests.values()}
    assert statuses <= {RequestStatus.FINISHED, RequestStatus.CANCELLED}, p.stats()
    stats = p.stats()
    assert stats["requests"]["finished"] > 300 and stats["requeued"] > 0
    if name == "flowprefill":  # the stream did exercise pausing, resuming and discarding
        assert stats["preemptions"] > 0 and stats["resumes"] > 0 and stats["discards"] > 0
    assert not p.units and not ex.paused


# ----------------------------------------------------------------------- overrun grace


def _overrunning_policy(grace: bool):
    """One worker, online correction on but frozen (``ewma_weight`` 0), the predictor having
    seen one unit run 1.5x its prediction: the overrun band is 1.5. ``long`` (1 s predicted,
    due at 100) runs from 0."""
    predictor = TTFTPredictor([0.0, 0.0, SPT, 0.0], 16384, PredictorConfig(ewma_weight=0.0))
    predictor.observe(1024, 1.5)
    assert predictor.overrun_ratio == 1.5 and predictor.correction == 1.0
    config = PolicyConfig(overrun_grace=grace, learn_unit_overhead=False)
    p = make_policy(config, predictor)
    assert p.on_event(WorkerJoined("w0"), 0.0) == []
    assert arrive(p, "long", 0.0, 1024, 100.0) == [run(1, "w0", ("long", 0, 1024))]
    return p


@pytest.mark.parametrize("grace", [True, False])
def test_a_unit_just_past_its_prediction_is_not_paused_for_a_newcomer_that_can_wait(grace):
    p = _overrunning_policy(grace)
    # At 1.2 s long has run 0.2 s past its prediction, within the 1.5x band (0.3 s left of
    # it). The newcomer (0.125 s of work, due 6.2) outranks it and could wait that long.
    out = arrive(p, "newcomer", 1.2, 128, 5.0)
    if grace:
        assert out == []  # long is most likely nearly done
    else:  # its predicted remaining is 0, so its slack looks ample: paused
        assert out == [Preempt("w0", 1), run(2, "w0", ("newcomer", 0, 128))]


def test_a_newcomer_that_would_miss_waiting_out_the_band_still_preempts():
    p = _overrunning_policy(True)
    # due 1.5 with 0.125 s of work: 0.175 s of slack, less than the band's 0.3 s rest.
    assert arrive(p, "urgent", 1.2, 128, 0.3) == [
        Preempt("w0", 1),
        run(2, "w0", ("urgent", 0, 128)),
    ]


def test_a_unit_past_the_band_is_preempted_as_before():
    p = _overrunning_policy(True)
    # At 1.6 s long has run past 1.5x its prediction: its rest is unknown, no grace.
    assert arrive(p, "newcomer", 1.6, 128, 5.0) == [
        Preempt("w0", 1),
        run(2, "w0", ("newcomer", 0, 128)),
    ]


# ----------------------------------------------------------------------- late grace


@pytest.mark.parametrize("grace", [True, False])
def test_a_paused_unit_within_the_underrun_band_is_not_demoted_as_late(grace):
    """One worker; the predictor (correction frozen) has seen a unit run at 0.8x its
    prediction, so its underrun band is 0.8. ``loose`` (4 s, due 4.5) is paused at 2 s for
    ``tight`` (0.75 s); when tight completes at 2.75 loose has 2 s predicted left and 1.75 s
    to its deadline: late at the prediction, feasible at 0.8x it (1.6 s)."""
    predictor = TTFTPredictor([0.0, 0.0, SPT, 0.0], 16384, PredictorConfig(ewma_weight=0.0))
    predictor.observe(1024, 0.8)
    assert predictor.underrun_ratio == 0.8 and predictor.overrun_ratio == 1.0
    p = make_policy(PolicyConfig(late_grace=grace, learn_unit_overhead=False), predictor)
    assert p.on_event(WorkerJoined("w0"), 0.0) == []
    assert arrive(p, "loose", 0.0, 4096, 4.5) == [run(1, "w0", ("loose", 0, 4096))]
    # tight has 0.25 s of slack, less than loose's 2 s left: it preempts either way.
    assert arrive(p, "tight", 2.0, 768, 1.0) == [Preempt("w0", 1), run(2, "w0", ("tight", 0, 768))]
    assert p.on_event(UnitPaused("w0", 1, executed_s=2.0), 2.0) == []
    assert arrive(p, "other", 2.5, 1024, 7.5) == []  # feasible, due 10
    out = p.on_event(UnitCompleted("w0", 2, executed_s=0.75), 2.75)
    if grace:  # loose can still make it (ranked by its deadline, 4.5 < 10): resumed
        assert out == [Resume("w0", 1)]
    else:  # loose is late: the feasible newcomer runs first
        assert out == [run(3, "w0", ("other", 0, 1024))]
