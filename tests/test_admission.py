"""Admission control, the bounded waiting queue and the paused-prefill memory budget.

Policies are driven by hand with a linear predictor of 2**-10 s per token (1024 tokens take
exactly 1 s), so every expected time below is exact; then random event streams check the
invariants after every event, and one simulation at about 3x capacity checks the outcome.
"""

from __future__ import annotations

import math
import random

import pytest
from policy_helpers import arrive, policy, run

from flowprefill_ray.scheduling import (
    AdmissionConfig,
    KVBudget,
    PolicyConfig,
    Request,
    RequestStatus,
    SLOConfig,
    TTFTPredictor,
    make_policy,
)
from flowprefill_ray.scheduling.events import (
    Arrival,
    Cancelled,
    Discard,
    Downgrade,
    Preempt,
    Reject,
    Resume,
    RunUnit,
    UnitCompleted,
    UnitPaused,
)
from flowprefill_ray.scheduling.records import RequestRecord
from flowprefill_ray.scheduling.waiting_work import BUCKET_S, WaitingWork
from flowprefill_ray.simulator import Simulator, SimulatorConfig
from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy
from flowprefill_ray.simulator.overload import (
    linear_cost_model,
    overload_requests,
    simulate_admission,
)


def reject_with(estimate: str, **extra) -> AdmissionConfig:
    return AdmissionConfig(action="reject", estimate=estimate, **extra)


# --------------------------------------------------------------------------- configuration


def test_the_old_admission_keys_are_refused_with_their_new_place():
    with pytest.raises(ValueError, match=r"reject_infeasible -> admission: \{action: reject"):
        PolicyConfig(reject_infeasible=True)
    with pytest.raises(ValueError, match="Input should be 'admit', 'reject' or 'downgrade'"):
        AdmissionConfig(action="drop")
    with pytest.raises(ValueError, match="greater than 0"):
        AdmissionConfig(max_waiting=0)
    # The default admits every request that fits in the waiting bound (today's behaviour).
    assert PolicyConfig().admission == AdmissionConfig(action="admit", max_waiting=10_000)


# --------------------------------------------------------------------------- the estimates


def _long_running_then_queue(estimate: str):
    """One worker busy with 4 s of work due at 4 s (no slack: nothing preempts it), then three
    1 s requests due at 6, 7 and 7.5 s, all admitted by either estimate."""
    p = policy(admission=reject_with(estimate))
    assert arrive(p, "long", 0.0, 4096, 4.0) == [run(1, "w0", ("long", 0, 4096))]
    for rid, slo in (("a", 6.0), ("b", 7.0), ("c", 7.5)):
        assert arrive(p, rid, 0.0, 1024, slo) == []
    return p


def test_queue_estimate_rejects_what_alone_admits_when_the_queue_is_long():
    alone = _long_running_then_queue("alone")
    queue = _long_running_then_queue("queue")
    # Ahead of a request due at 7.5 s: 4 s running + a, b, c (1 s each) = 7 s; with its own
    # 1 s it would finish at 8 s. Alone it needs only 1 s of its 7.5 s.
    assert queue.work_ahead_s(7.5, 0.0) == 7.0
    assert arrive(alone, "d", 0.0, 1024, 7.5) == []
    assert alone.request_view("d").status is RequestStatus.WAITING
    (decision,) = arrive(queue, "d", 0.0, 1024, 7.5)
    assert isinstance(decision, Reject) and decision.request_id == "d"
    assert "after 7.000s of earlier work" in decision.reason
    assert queue.request_view("d").status is RequestStatus.REJECTED
    # A request due later than everything queued but with room for it is still admitted:
    # 4 + 3 = 7 s ahead, 1 s of its own, due at 8 s.
    assert arrive(queue, "e", 0.0, 1024, 8.0) == []
    # Earlier-deadline work only: a 0.25 s request due at 4.5 s has just the running unit ahead.
    assert queue.work_ahead_s(4.5, 0.0) == 4.0


def test_queue_estimate_follows_time_starts_and_cancellations():
    p = _long_running_then_queue("queue")
    assert p.on_event(Cancelled("b"), 1.0) == []
    # 3 s of the long unit left, a and c ahead of a request due at 7.5 s.
    assert p.work_ahead_s(7.5, 1.0) == 5.0
    # The long unit completes at 4 s and a starts: 1 s running + c's 1 s.
    assert p.on_event(UnitCompleted("w0", 1, 4.0), 4.0) == [run(2, "w0", ("a", 0, 1024))]
    assert p.work_ahead_s(7.5, 4.0) == 2.0
    # At 6.6 s c (due 7.5 s, 1 s of work) can no longer make it: it leaves the estimate.
    assert p.work_ahead_s(7.5, 6.6) == pytest.approx(0.0)  # a is done as predicted at 5 s


def test_queue_estimate_is_the_alone_test_while_a_worker_is_idle():
    p = policy(workers=2, admission=reject_with("queue"))
    assert arrive(p, "long", 0.0, 4096, 4.0) == [run(1, "w0", ("long", 0, 4096))]
    # w1 is idle: 1 s of its own within 1 s, although 4 s of work runs elsewhere.
    assert arrive(p, "fits", 0.0, 1024, 1.0) == [run(2, "w1", ("fits", 0, 1024))]


def test_admission_protects_admitted_requests_due_later():
    p = policy(admission=reject_with("queue"))
    assert arrive(p, "long", 0.0, 4096, 4.0) == [run(1, "w0", ("long", 0, 4096))]
    assert arrive(p, "file", 0.0, 1024, 6.0) == []  # finishes at 5 s: 1 s to spare
    # 1.5 s due at 5.5 s would itself make it (4 + 1.5), but would finish the file request at
    # 6.5 s: refused. 1 s fits exactly.
    (refused,) = arrive(p, "urgent", 0.0, 1536, 5.5)
    assert isinstance(refused, Reject)
    assert refused.reason == (
        "its prefill (1.500s) would push an admitted request past its deadline "
        "(room for 1.000s before it)"
    )
    assert arrive(p, "fits", 0.0, 1024, 5.5) == []
    unprotected = policy(admission=reject_with("queue", protect_admitted=False))
    arrive(unprotected, "long", 0.0, 4096, 4.0)
    arrive(unprotected, "file", 0.0, 1024, 6.0)
    assert arrive(unprotected, "urgent", 0.0, 1536, 5.5) == []


def test_protect_units_keeps_a_running_or_paused_unit_due_later_on_time():
    """Without it a request is protected only while it waits: a tighter arrival passes on its
    own deadline and preempts the running unit past its own. With it the unit's most urgent
    feasible member is protected wherever the unit is, and a late unit is not."""
    for protect_units, admitted in ((False, True), (True, False)):
        p = policy(admission=reject_with("queue", protect_units=protect_units))
        assert arrive(p, "loose", 0.0, 3072, 4.0) == [run(1, "w0", ("loose", 0, 3072))]
        # 1.5 s due at 2 s makes it by preempting; the unit (3 s due at 4 s) would end at 4.5 s.
        decisions = arrive(p, "urgent", 0.0, 1536, 2.0)
        assert (decisions[0] == Preempt("w0", 1)) is admitted, decisions
        if not admitted:
            (refused,) = decisions
            assert refused.reason == (
                "its prefill (1.500s) would push an admitted request past its deadline "
                "(room for 1.000s before it)"
            )
    # 1 s fits exactly: admitted, the unit is paused; the paused unit is protected too.
    assert arrive(p, "fits", 0.0, 1024, 2.0) == [Preempt("w0", 1), run(2, "w0", ("fits", 0, 1024))]
    assert p.on_event(UnitPaused("w0", 1, 0.0), 0.0) == []
    assert isinstance(arrive(p, "more", 0.0, 512, 3.0)[0], Reject)  # 0.5 s > 0 s of room
    # Past 1 s the paused unit (3 s left, due at 4 s) is late: no longer protected.
    assert p.spare_work_s(3.5, 1.5) == math.inf
    assert p.units_spare_s(3.5, 0.5, p.waiting_work) == 0.0


def test_headroom_admits_only_with_that_share_of_the_target_to_spare():
    """With headroom 0.1, a request must be predicted to finish a tenth of its target before
    its deadline, and protection keeps that margin for admitted requests too."""
    plain = policy(admission=reject_with("queue"))
    margin = policy(admission=reject_with("queue", headroom=0.1))
    for p in (plain, margin):
        # 4 s due at 4.5 s: admitted either way; nothing due later preempts it.
        assert arrive(p, "long", 0.0, 4096, 4.5) == [run(1, "w0", ("long", 0, 4096))]
    # 4 s running + 1 s of its own = 5 s: due at 5 s it makes it exactly, but not 0.5 s early.
    assert arrive(plain, "exact", 0.0, 1024, 5.0) == []
    (refused,) = arrive(margin, "exact", 0.0, 1024, 5.0)
    assert isinstance(refused, Reject) and "predicted to miss" in refused.reason
    # Due at 5.75 s: 5 s <= 5.75 - 0.575, admitted with 0.175 s to spare before its margin.
    assert arrive(margin, "roomy", 0.0, 1024, 5.75) == []
    # 0.5 s due at 5.25 s makes its own margin (4.5 <= 4.725) but would finish "roomy" at
    # 5.5 s, inside roomy's: refused. Without headroom roomy has 0.75 s to spare: admitted.
    (pushed,) = arrive(margin, "urgent", 0.0, 512, 5.25)
    assert isinstance(pushed, Reject) and "push an admitted request" in pushed.reason
    plain = policy(admission=reject_with("queue"))
    arrive(plain, "long", 0.0, 4096, 4.5)
    arrive(plain, "roomy", 0.0, 1024, 5.75)
    assert arrive(plain, "urgent", 0.0, 512, 5.25) == []


def test_reserve_for_tighter_keeps_room_for_the_tight_arrivals_seen_recently():
    """A loose request is admitted only if the work tighter classes have been bringing
    (recent rate x the part of its window in which their arrivals would fall due) still fits."""

    def feed(p):
        # 1 s running keeps the worker busy; then tight (2 s) requests of 0.25 s each, one
        # per second for 40 s, each started and completed at once: the tight rate settles
        # near 0.25 s of work per second, and nothing of it is waiting.
        assert arrive(p, "busy", 0.0, 1024 * 60, 100.0) == [run(1, "w0", ("busy", 0, 61440))]
        for i in range(40):
            arrive(p, f"t{i}", float(i), 256, 2.0)
            p.on_event(Cancelled(f"t{i}"), float(i))

    plain = policy(admission=reject_with("queue", protect_admitted=False))
    keep = policy(admission=reject_with("queue", protect_admitted=False, reserve_for_tighter=True))
    double = policy(
        admission=reject_with(
            "queue", protect_admitted=False, reserve_for_tighter=True, reserve_factor=2.0
        )
    )
    for p in (plain, keep, double):
        feed(p)
    rate = keep.admission.arrivals.rate(2.0, 40.0)
    assert rate == pytest.approx(0.25 * (1 - math.exp(-40 / 30)), rel=0.05)
    # The long unit is due at 100 s: under a preemptive policy it runs after anything due
    # earlier, so ahead of a 10 s request there is nothing; 9 s of its own fits 10 s.
    assert arrive(plain, "loose", 40.0, 9216, 10.0) == []
    # Tight requests arriving in the next 10 - 2 = 8 s fall due before it: 8 s x rate kept.
    (refused,) = arrive(keep, "loose", 40.0, 9216, 10.0)
    assert isinstance(refused, Reject)
    assert f"and {rate * 8:.3f}s kept for tighter SLO classes" in refused.reason
    assert arrive(keep, "smaller", 40.0, 8192, 10.0) == []  # 8 s + 1.48 s fits
    # reserve_factor 2 keeps room for the tight class at twice its recent rate: 2.96 s.
    (doubled,) = arrive(double, "smaller", 40.0, 8192, 10.0)
    assert isinstance(doubled, Reject)
    assert f"and {rate * 16:.3f}s kept for tighter SLO classes" in doubled.reason
    assert arrive(double, "small", 40.0, 7168, 10.0) == []  # 7 s + 2.96 s fits
    # A tight arrival reserves nothing for itself or looser classes.
    assert keep.admission.arrivals.expected_tighter_s(2.0, 40.0) == 0.0


def test_arrival_rates_decay_and_stay_bounded_whatever_targets_clients_send():
    from flowprefill_ray.scheduling.arrival_rates import ArrivalRates

    rates = ArrivalRates(window_s=10.0)
    rates.add(1.0, 5.0, 0.0)
    assert rates.rate(1.0, 0.0) == pytest.approx(0.5)
    assert rates.rate(1.0, 10.0) == pytest.approx(0.5 / math.e)
    for i in range(100_000):
        rates.add(0.5 + i * 1e-4, 0.01, 1.0)  # 100,000 distinct explicit targets
    assert len(rates._rates) < 100  # a 5 % grid: 0.5..10.5 s spans ~63 steps
    # Targets within one step share it; the horizon test uses the largest of them.
    assert rates.expected_tighter_s(0.5, 1.0) == 0.0


def test_a_request_the_estimate_gives_up_on_does_not_block_arrivals():
    p = policy(admission=reject_with("queue"))
    arrive(p, "long", 0.0, 4096, 4.0)
    assert arrive(p, "a", 0.0, 1024, 6.0) == []  # done at 5 s
    assert arrive(p, "b", 0.0, 1024, 6.5) == []  # done at 6 s
    # The long unit overruns: at 4.6 s it still runs. a can finish at 5.6 s, b at 6.6 s > 6.5:
    # the estimate gives b up (it is still feasible alone, due 6.5 s with 1 s of work).
    assert arrive(p, "x", 4.6, 256, 1.6) == []  # 4.6 + 1 (a) + 0.25 <= 6.2
    assert p.stats()["admission_unprotected"] == 1
    assert p.request_view("b").status is RequestStatus.WAITING


def _brute_force_index(predictor, live, protected, now, workers, busy_s, due):
    """``(work_before_s, spare_work_s)`` of the waiting-work index, computed directly."""
    window = math.floor(now / BUCKET_S)
    feasible = {rid: e for rid, e in live.items() if e["latest_start"] >= now}
    by_bucket: dict[int, list[str]] = {}
    for rid, e in feasible.items():
        by_bucket.setdefault(e["bucket"], []).append(rid)
    floor = now * workers + busy_s
    value, before = {}, 0
    for bucket in sorted(by_bucket):
        before += sum(feasible[rid]["ns"] for rid in by_bucket[bucket])
        value[bucket] = bucket * BUCKET_S * workers - before / 1e9
        if any(rid in protected for rid in by_bucket[bucket]) and value[bucket] < floor:
            protected.difference_update(by_bucket[bucket])  # given up for good
    last = math.floor(due / BUCKET_S)
    work = sum(e["ns"] for e in feasible.values() if e["bucket"] <= last) / 1e9
    later = [
        value[b] - floor
        for b in by_bucket
        if b > last and b >= window and any(rid in protected for rid in by_bucket[b])
    ]
    return work, min(later, default=math.inf)


def test_waiting_work_index_matches_a_brute_force_computation():
    """Random adds, removals and queries over 300 s (the 64 s ring wraps several times),
    with the online correction moving, against a direct computation."""
    rng = random.Random(7)
    grid = range(64, 20481, 512)
    predictor = TTFTPredictor.fit([(t, 0.01 + 6e-5 * t + 3e-10 * t * t) for t in grid])
    index = WaitingWork(predictor)
    live: dict[str, dict] = {}
    protected: set[str] = set()
    now = 0.0
    for step in range(3000):
        now += rng.expovariate(10.0)
        roll = rng.random()
        if roll < 0.5:
            rid = f"r{step}"
            slo = rng.choice((0.25, 0.5, 4.0, 6.0, rng.uniform(0.1, 60.0)))
            tokens = rng.randint(16, 20000)
            rec = RequestRecord(
                request=None,  # the index reads only the fields below
                request_id=rid,
                arrival_s=now,
                deadline_s=now + slo,
                ttft_slo_s=slo,
                slo_class="text",
                prompt_tokens=tokens,
                tiebreak=(0, step),
            )
            index.add(rec, now)
            predicted = predictor.predict(tokens)  # with the correction in force now
            if rec.deadline_s - predicted >= now:
                live[rid] = {
                    "latest_start": rec.deadline_s - predicted,
                    "bucket": math.floor(rec.deadline_s / BUCKET_S),
                    "ns": round(predicted * 1e9),
                }
                protected.add(rid)
        elif roll < 0.75 and live:
            rid = rng.choice(sorted(live))
            index.remove(rid)
            del live[rid]
        if rng.random() < 0.1:
            predictor.correction = rng.uniform(0.8, 1.2)
        due = now + rng.uniform(-1.0, 30.0)
        workers = rng.choice((1, 2, 2, 2, 4))
        busy = rng.uniform(0.0, 2.0)
        work, spare = _brute_force_index(predictor, live, protected, now, workers, busy, due)
        assert index.work_before_s(due, now) == pytest.approx(work, rel=1e-9, abs=1e-9)
        assert index.spare_work_s(due, now, workers, busy) == pytest.approx(
            spare, rel=1e-9, abs=1e-9
        )
        live = {rid: e for rid, e in live.items() if e["latest_start"] >= now}
    assert index.unprotected > 0  # giving up on requests was exercised


# --------------------------------------------------------------------------- downgrade


def test_downgrade_moves_a_request_to_the_tightest_looser_class_that_makes_it():
    p = policy(workers=3, admission=AdmissionConfig(action="downgrade", estimate="alone"))
    # text 0.25 s, image 0.5 s, search 4 s, file 6 s.
    assert arrive(p, "fits", 0.0, 200, cls="text") == [run(1, "w0", ("fits", 0, 200))]
    assert arrive(p, "to-image", 0.0, 400, cls="text") == [  # 0.39 s
        Downgrade("to-image", "image", 0.5),
        run(2, "w1", ("to-image", 0, 400)),
    ]
    view = p.request_view("to-image")
    assert (view.slo_class, view.ttft_slo_s, view.deadline_s) == ("image", 0.5, 0.5)
    assert arrive(p, "to-search", 0.1, 2048, cls="image") == [  # 2 s
        Downgrade("to-search", "search", 4.0),
        run(3, "w2", ("to-search", 0, 2048)),
    ]
    assert p.request_view("to-search").deadline_s == 4.1
    assert p.stats()["downgrades"] == 2


def test_downgrade_rejects_when_no_class_helps_or_the_target_is_explicit():
    p = policy(admission=AdmissionConfig(action="downgrade", estimate="alone"))
    (too_long,) = arrive(p, "huge", 0.0, 8192, cls="text")  # 8 s > the file class's 6 s
    assert isinstance(too_long, Reject) and "no looser SLO class would make it" in too_long.reason
    # An explicit 0.3 s target is the client's own, not the text class's 0.25 s.
    (explicit,) = arrive(p, "mine", 0.0, 1024, slo_s=0.3, cls="text")
    assert isinstance(explicit, Reject) and "explicit TTFT target" in explicit.reason
    assert p.stats()["downgrades"] == 0 and p.stats()["rejects"] == 2


@pytest.mark.parametrize(
    "name,running_slo_class,expected",
    [
        # fcfs never preempts: 8 s of running work comes first; 9 s > image's 1 s and search's
        # 8 s, file's 12 s makes it.
        ("fcfs", "search", Downgrade("urgent", "file", 12.0)),
        # flowprefill takes the worker from a unit due later (the search one, due at 8 s), so
        # only its own 1 s counts: image (1 s) makes it - and it preempts at once.
        ("flowprefill", "search", Downgrade("urgent", "image", 1.0)),
        # A running unit due at 1 s ranks first: image would need 2 s; search makes it.
        ("flowprefill", "image", Downgrade("urgent", "search", 8.0)),
    ],
)
def test_downgrade_uses_the_policy_slo_config_and_the_queue_estimate(
    name, running_slo_class, expected
):
    slo = SLOConfig(scale=2.0)  # text 0.5, image 1, search 8, file 12 s
    p = policy(name, slo=slo, admission=AdmissionConfig(action="downgrade", estimate="queue"))
    tokens = 8192 if running_slo_class == "search" else 1024  # exactly its target
    running = Request(
        request_id="running", arrival_s=0.0, prompt_tokens=tokens, slo_class=running_slo_class
    ).with_slo(slo)
    urgent = Request(
        request_id="urgent", arrival_s=0.0, prompt_tokens=1024, slo_class="text"
    ).with_slo(slo)
    assert p.on_event(Arrival(running), 0.0) == [run(1, "w0", ("running", 0, tokens))]
    decisions = p.on_event(Arrival(urgent), 0.0)
    assert decisions[0] == expected
    assert p.request_view("urgent").deadline_s == expected.ttft_slo_s
    assert (Preempt("w0", 1) in decisions) == (expected.slo_class == "image")


# --------------------------------------------------------------------------- waiting bound


def test_max_waiting_rejects_arrivals_beyond_it_whatever_the_action():
    p = policy("fcfs", admission=AdmissionConfig(action="admit", max_waiting=2))
    # 1500-token prompts: two never fit in one 2048-token fcfs unit.
    assert arrive(p, "r0", 0.0, 1500, 60.0) == [run(1, "w0", ("r0", 0, 1500))]
    assert arrive(p, "r1", 0.0, 1500, 60.0) == []
    assert arrive(p, "r2", 0.0, 1500, 60.0) == []
    (full,) = arrive(p, "r3", 0.0, 1500, 60.0)
    assert isinstance(full, Reject)
    assert full.reason == (
        "the waiting queue is full: 2 requests are waiting (admission.max_waiting = 2)"
    )
    assert p.stats()["rejects_queue_full"] == 1 and p.waiting == 2
    # A start frees a place.
    assert p.on_event(UnitCompleted("w0", 1, 1.5), 1.5) == [run(2, "w0", ("r1", 0, 1500))]
    assert arrive(p, "r4", 1.5, 1500, 60.0) == []


@pytest.mark.parametrize("name", ["flowprefill", "fcfs", "chunked"])
@pytest.mark.parametrize("action,budget", [("admit", None), ("downgrade", 2000)])
def test_waiting_count_is_exact_and_arrivals_never_exceed_max_waiting(name, action, budget):
    rng = random.Random(3)
    admission = AdmissionConfig(action=action, estimate="queue", max_waiting=5)
    kv = None if budget is None else KVBudget.of_tokens(budget)
    p = policy(name, workers=2, chunk_size=256, kv_budget=kv, admission=admission)
    driver = WorkerDriver(p, rng)
    rejected = 0
    for step in range(1500):
        now = step * 0.01
        roll = rng.random()
        if roll < 0.6:
            before = p.waiting
            decisions = driver.event(Arrival(random_request(rng, f"r{step}", now)), now)
            refused = any(isinstance(d, Reject) for d in decisions)
            rejected += refused
            assert refused or before < 5  # admitted only below the bound
        elif roll < 0.7 and driver.known:
            driver.event(Cancelled(rng.choice(driver.known)), now)
        else:
            driver.step(now)
        waiting = {rid for rid, rec in p.requests.items() if rec.status is RequestStatus.WAITING}
        assert p.waiting == len(waiting)
        # Only evicted requests (already admitted) can come back over the bound.
        assert p.waiting <= 5 or p.stats()["evicted_requests"] > 0
        if p.waiting_work is not None:  # the index holds only waiting requests
            assert all(rid in waiting for rid in driver.known if rid in p.waiting_work)
    assert rejected > 100  # the bound was reached often


# --------------------------------------------------------------------------- paused budget


class WorkerDriver:
    """Plays the workers: starts what it is told, answers a preempt with a pause on a later
    step, completes running units at random."""

    def __init__(self, policy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.running: dict[str, int] = {}  # worker -> unit id
        self.pausing: dict[str, int] = {}
        self.known: list[str] = []
        self.decisions: list = []

    def event(self, event, now: float) -> list:
        if isinstance(event, Arrival):
            self.known.append(event.request.request_id)
        out = self.policy.on_event(event, now)
        self.decisions.extend(out)
        for d in out:
            if isinstance(d, RunUnit):
                self.running[d.worker_id] = d.unit.unit_id
            elif isinstance(d, Resume):
                self.running[d.worker_id] = d.unit_id
            elif isinstance(d, Preempt):
                self.pausing[d.worker_id] = d.unit_id
        return out

    def step(self, now: float) -> None:
        """One worker event: a pending pause is acknowledged, or a running unit completes."""
        if self.pausing and self.rng.random() < 0.7:
            worker = self.rng.choice(sorted(self.pausing))
            unit = self.pausing.pop(worker)
            del self.running[worker]
            self.event(UnitPaused(worker, unit, 0.01), now)
        elif self.running:
            worker = self.rng.choice(sorted(self.running))
            unit = self.running.pop(worker)
            self.pausing.pop(worker, None)  # finished before it reached a checkpoint
            self.event(UnitCompleted(worker, unit, 0.01), now)


def random_request(rng: random.Random, rid: str, now: float) -> Request:
    """Half with an explicit target, half with a class (only those can be downgraded)."""
    explicit = rng.random() < 0.5
    return Request(
        request_id=rid,
        arrival_s=now,
        prompt_tokens=rng.choice((64, 300, 900, 1500, 2500)),
        slo_class=rng.choice(("text", "image", "search", "file")),
        ttft_slo_s=rng.choice((0.1, 0.5, 2.0, 6.0)) if explicit else None,
    )


def _paused_budget_stream(budget: int | None, deadlines: dict[str, float], seed: int = 11):
    """A random stream over 2 workers; yields the policy after every event and records each
    request's deadline in ``deadlines``."""
    rng = random.Random(seed)
    # after_pause: the driver answers a preemption before the next unit is decided.
    kv = None if budget is None else KVBudget.of_tokens(budget)
    p = policy(workers=2, kv_budget=kv, handover="after_pause")
    driver = WorkerDriver(p, rng)
    for step in range(2000):
        now = step * 0.005
        roll = rng.random()
        if roll < 0.45:
            req = random_request(rng, f"r{step}", now)
            deadlines[req.request_id] = req.deadline_s
            driver.event(Arrival(req), now)
        elif roll < 0.5 and driver.known:
            driver.event(Cancelled(rng.choice(driver.known)), now)
        else:
            driver.step(now)
        yield p
    # Drain: everything admitted finishes (or was cancelled).
    while driver.running or driver.pausing:
        now += 0.005
        driver.step(now)
        yield p


def test_paused_tokens_never_exceed_the_budget_and_evicted_requests_finish():
    budget = 3000
    peak = 0
    deadlines: dict[str, float] = {}
    for p in _paused_budget_stream(budget, deadlines):
        for w in p.workers.values():
            held = p.paused_tokens(w)
            assert held <= budget
            peak = max(peak, held)
    for rid, deadline in deadlines.items():  # evictions kept every deadline
        assert p.request_view(rid).deadline_s == deadline
    stats = p.stats()
    assert stats["evictions"] > 0 and stats["evicted_requests"] > 0
    assert peak > budget // 2  # the budget was actually in play
    statuses = {p.request_view(rid).status for rid in deadlines}
    assert statuses <= {RequestStatus.FINISHED, RequestStatus.CANCELLED}


def test_without_a_budget_the_same_stream_holds_more_paused_tokens():
    peak = max(
        max(p.paused_tokens(w) for w in p.workers.values()) for p in _paused_budget_stream(None, {})
    )
    assert peak > 3000


def _preempted_twice(budget: int):
    """big1 (3000 tokens, due at 60 s) runs; mid (2000, due 5 s) preempts it at 0.5 s;
    small (1500, due 2.2 s) would preempt mid at 0.6 s."""
    p = policy(kv_budget=KVBudget.of_tokens(budget), handover="after_pause")
    assert arrive(p, "big1", 0.0, 3000, 60.0) == [run(1, "w0", ("big1", 0, 3000))]
    assert arrive(p, "mid", 0.5, 2000, 4.5) == [Preempt("w0", 1)]
    assert p.on_event(UnitPaused("w0", 1, 0.5), 0.5) == [run(2, "w0", ("mid", 0, 2000))]
    return p, arrive(p, "small", 0.6, 1500, 1.6)


def test_eviction_requeues_the_paused_request_with_its_deadline_and_it_finishes_later():
    p, decisions = _preempted_twice(budget=4096)
    # Holding big1 (3000) and mid (2000) paused would need 5000 tokens: big1 is evicted.
    assert decisions == [Discard("w0", 1), Preempt("w0", 2)]
    view = p.request_view("big1")
    assert view.status is RequestStatus.WAITING
    assert (view.deadline_s, view.prefilled_tokens, view.executed_s) == (60.0, 0, 0.0)
    assert p.paused_tokens(p.workers["w0"]) == 2000  # mid, pausing
    assert p.on_event(UnitPaused("w0", 2, 0.1), 0.6) == [run(3, "w0", ("small", 0, 1500))]
    assert p.on_event(UnitCompleted("w0", 3, 1.46), 2.06) == [Resume("w0", 2)]
    # big1 starts over as a new unit: all 3000 tokens are recomputed.
    assert p.on_event(UnitCompleted("w0", 2, 1.95), 3.91) == [run(4, "w0", ("big1", 0, 3000))]
    assert p.on_event(UnitCompleted("w0", 4, 2.93), 6.84) == []
    assert p.request_view("big1").status is RequestStatus.FINISHED
    stats = p.stats()
    assert (stats["evictions"], stats["evicted_requests"], stats["discards"]) == (1, 1, 1)


def test_a_unit_larger_than_the_budget_is_never_preempted():
    p = policy(kv_budget=KVBudget.of_tokens(2500))
    assert arrive(p, "big1", 0.0, 3000, 60.0) == [run(1, "w0", ("big1", 0, 3000))]
    # mid would preempt big1 (as above), but big1 alone would exceed 2500 paused tokens.
    assert arrive(p, "mid", 0.5, 2000, 4.5) == []
    assert p.stats()["preemptions"] == 0


# --------------------------------------------------------------------------- simulation


OVERLOAD_SLO = SLOConfig(scale=2.0)  # text / image / search / file: 0.5 / 1 / 8 / 12 s


@pytest.fixture(scope="module")
def overload():
    """The scenario of ``simulator/overload.py``: two workers serving 10 requests/s, requests
    arriving at 30/s, classes in turn at twice the paper's targets. Runs of 600 and 1200
    requests (20 s and 40 s of arrivals)."""
    cost = linear_cost_model()
    requests = {n: overload_requests(n, OVERLOAD_SLO) for n in (600, 1200)}
    return cost, fit_predictor(cost), requests


def _simulate(overload, admission: AdmissionConfig, budget: int | None = None, n: int = 600):
    """One flowprefill run; returns the result and the most requests ever WAITING."""
    cost, predictor, requests = overload
    return simulate_admission(
        requests[n],
        cost,
        predictor,
        OVERLOAD_SLO,
        admission,
        kv_budget=None if budget is None else KVBudget.of_tokens(budget),
    )


def test_at_3x_capacity_queue_admission_keeps_admitted_requests_on_time_and_the_queue_bounded(
    overload,
):
    admit = {n: _simulate(overload, AdmissionConfig(action="admit"), n=n) for n in (600, 1200)}
    shed = {n: _simulate(overload, reject_with("queue"), n=n) for n in (600, 1200)}
    for n in (600, 1200):
        admitted_all, _ = admit[n]
        assert admitted_all.rejected == 0 and admitted_all.admitted_attainment < 0.7
        result, _ = shed[n]
        assert result.rejected > 0.3 * n
        assert result.admitted_attainment >= 0.9
        assert all(o.prefill_completions == (0 if o.rejected else 1) for o in result.outcomes)
    # Admitting everything, the waiting queue grows with the length of the overload; with the
    # queue estimate it stays where it was.
    assert admit[1200][1] > 1.7 * admit[600][1]
    assert shed[1200][1] < 1.2 * shed[600][1]
    assert shed[1200][1] < admit[1200][1] / 3


def test_at_3x_capacity_downgrade_admits_more_and_reports_both_targets(overload):
    down, _ = _simulate(overload, AdmissionConfig(action="downgrade", estimate="queue"))
    shed, _ = _simulate(overload, reject_with("queue"))
    assert down.downgraded > 0 and down.rejected < shed.rejected
    summary = down.summary()
    assert summary["downgraded"] == down.downgraded
    # Against the downgraded targets more requests count as on time than against the originals.
    assert summary["attainment_in_force"] > summary["attainment"]
    assert summary["admitted_attainment"] >= 0.9
    downgraded = [o for o in down.outcomes if o.downgraded_slo_s is not None]
    assert all(o.downgraded_slo_s > o.ttft_slo_s for o in downgraded)


class PausedPeak:
    """Forwards events to a policy and records the most paused tokens any worker held."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.peak = 0

    def on_event(self, event, now):
        out = self.policy.on_event(event, now)
        for w in self.policy.workers.values():
            self.peak = max(self.peak, self.policy.paused_tokens(w))
        return out


def _long_and_urgent(num_requests: int, rate_per_s: float, seed: int = 1) -> list[Request]:
    """Poisson arrivals, each a 200-token text, 3000-token search or 5000-token file request:
    urgent ones preempt long ones, and search ones preempt file ones."""
    rng = random.Random(seed)
    now, requests = 0.0, []
    for i in range(num_requests):
        now += rng.expovariate(rate_per_s)
        slo_class, tokens = rng.choice((("text", 200), ("search", 3000), ("file", 5000)))
        request = Request(
            request_id=f"m{i}", arrival_s=now, prompt_tokens=tokens, slo_class=slo_class
        )
        requests.append(request.with_slo(OVERLOAD_SLO))
    return requests


def test_simulated_evictions_recompute_the_request_and_conserve_work(overload):
    cost, predictor, _ = overload
    requests = _long_and_urgent(200, 1.0)
    results = {}
    for budget in (None, 6000):
        kv = None if budget is None else KVBudget.of_tokens(budget)
        probe = PausedPeak(make_policy(PolicyConfig(), fresh_copy(predictor), slo=OVERLOAD_SLO))
        result = Simulator(probe, cost, SimulatorConfig(num_workers=2, kv_budget=kv)).run(requests)
        results[budget] = result, probe.peak
    unbounded, unbounded_peak = results[None]
    result, peak = results[6000]
    assert unbounded_peak > 6000 >= peak
    assert result.evictions > 0 and unbounded.evictions == 0
    assert all(o.prefill_completions == 1 for o in result.outcomes)  # each finished once
    busy = sum(w.busy_s for w in result.workers)
    assert busy == pytest.approx(result.work_s, rel=1e-9)
    discarded = result.decisions.get("Discard", 0)
    assert discarded == result.evictions and sum(w.discarded_s for w in result.workers) > 0
    # Every pause ended in a resume or an eviction.
    pauses = sum(w.pauses for w in result.workers)
    assert pauses == sum(w.resumes for w in result.workers) + discarded
