"""Admission control: on arrival, admit a request, reject it (HTTP 429), or downgrade it.

Two checks, in this order:

1. **Bounded waiting queue.** With ``max_waiting`` set, an arrival that finds that many
   requests already WAITING is rejected, whatever ``action`` says. (Requests re-queued after
   an eviction or a lost worker were admitted before and are never dropped for it, so they can
   lift the count above the bound by the size of the units they came from.)
2. **Predicted miss** (only when ``action`` is not ``admit``). The request would miss its TTFT
   deadline if ``now + wait + predict(prompt) > deadline``, where ``wait`` is

   - ``alone``: 0 (it cannot make it even if run at once on an idle worker);
   - ``queue``: 0 while some worker is idle; when every worker is busy, an
     earliest-deadline-first estimate of the work that runs before it, spread over the
     workers: ``(remaining predicted compute of the running units that run before it + that
     of paused units due no later than it and still feasible + predicted prefill of waiting,
     still-feasible requests due no later than it) / workers``. Under a preemptive policy
     (flowprefill) only running units due no later and still feasible run before it; under
     the others every running unit does. See ``waiting_work.py`` for how the last term stays
     O(log n) per arrival.

   With ``queue`` and ``protect_admitted`` a request is also refused when its own predicted
   prefill would push a protected admitted request due after it past its deadline under the
   same estimate: admission is then a promise to what was admitted, not only a check of the
   newcomer. Without it, a stream of urgent arrivals that each pass their own test can push
   earlier-admitted requests with looser targets late (at 3x overload in the simulator that
   cost about one admitted request in nine its SLO). A request the estimate already gives up
   on is not protected (it would block every earlier-deadline arrival until it turns late).
   ``protect_units`` extends the promise to requests whose units already run or are paused
   (each unit's most urgent member that can still make it): otherwise a loose unit, once
   started, is preempted by every tighter arrival that passes its own test, until it turns
   late and waits behind all feasible work (``WorkEstimates.units_spare_s``).

   With ``headroom`` h the deadline tested is ``deadline - h x target``: a request is
   admitted only with that margin left. The queue estimate sums predicted compute alone; on
   the live runtime each unit also costs a dispatch round trip (~5 ms on CPU, measured with
   the scheduler timeline), and a request admitted to finish exactly at its deadline behind
   a deep queue turns late by those gaps - and, once late, FlowPrefill demotes it behind all
   feasible work (tests/test_overload.py showed such requests waiting 70 s).

   With ``queue`` and ``reserve_for_tighter`` the wait also counts the work that tighter SLO
   classes are expected to bring before the deadline: for each class with a target ``T``
   below the time left ``H``, its recent arrival rate of predicted prefill (``ArrivalRates``,
   an exponentially decaying average over ``reserve_window_s``) times ``H - T`` - requests
   arriving in the next ``H - T`` seconds fall due first, and earliest-deadline-first runs
   them first. Without it, a burst of loose requests is admitted up to the last second of
   its long window; the tight requests that arrive meanwhile then find that window full and
   are refused (two Azure tenants on SmolLM2: 57 of 867 urgent requests, 38 of them to
   protect admitted relaxed ones; docs/results/why_late.json). The reservation moves those
   refusals to the loose tenant: a policy choice, measured in docs/results/why_late_sim.json.
   With ``reserve_cost: measured`` each class's rate is scaled by what its work has recently
   cost: completed units' compute, shared among their members by predicted prefill, over those
   members' predicted prefill (``ArrivalRates.observe_cost``). Prompts batched into one
   forward share its fixed cost, so a sum of single-prompt predictions over-states what a
   busy tight class takes from the worker. ``reserve_factor`` scales the room kept: the rate
   is a recent average, while the loose work admitted now falls due seconds later, when a
   bursty tight class may arrive at twice that rate (the two Azure tenants: 13 -> 25-33
   urgent arrivals per 10 s right after a relaxed burst).

   With ``queue`` and ``queue_cost: measured`` the waiting requests' predicted prefill in
   ``wait`` is priced at what completed units of the arrival's own and tighter targets have
   recently cost per predicted second (``ArrivalRates.cost_ratio_upto``, at most 1, at
   least ``MIN_QUEUE_COST``). The predictions are single prompts'; the waiting ones run
   batched and share each forward's fixed cost. Live on two cores, batched units of a few
   short urgent prompts cost ~0.8x the sum of their members' predictions, and 17 of the 20
   urgent refusals at x0.38 had only urgent work ahead (issue 21). Running and paused units
   stay at their predicted remaining compute, and the arrival's own prefill too (it may run
   alone); protection (``spare_work_s``) is not discounted. Measured, it lost: within a
   burst it admits more of the first arrivals, which fill the window the later ones need
   (live x0.38: urgent 0.949 against 0.971; docs/SCHEDULING.md), so it is off by default.

   With ``queue`` and ``overtake_looser`` a request of a class that has looser classes, refused
   by the tests above, is tested once more as if only its own and tighter classes were
   waiting (their waiting work, its protection; running and paused units all count). If it
   passes, it is admitted ahead of the looser classes (tiering): looser waiting requests due
   before it, largest predicted prefill first, are demoted behind all feasible work until the
   whole queue's estimate fits (``Overtaken``, one per request demoted; see ``overtaking.py``),
   and looser requests due after it may be pushed past their deadlines. The tight class's
   promise is kept at the cost of the loose one's, and only when the two collide: a
   reservation (above) pays for collisions that may never come. FlowPrefill only (it needs
   the late queue to demote into). With ``overtaken: refuse`` the overtaken requests are
   refused at once instead (429): none of 44 demoted live ever met its target, and serving
   them late spent compute the next arrivals needed. ``max_overtaken: k`` refuses an arrival
   that would overtake more than ``k`` requests: by count, one refusal costs less than two
   demotions (live, 21 overtakers once demoted 34 requests, none of which met its target).

   On a predicted miss ``reject`` refuses the request; ``downgrade`` moves it to the tightest
   looser SLO class (larger TTFT target) of the policy's ``SLOConfig`` under which the same
   test passes, with deadline ``arrival + that target``, or rejects it if none does. Only a
   request whose target is its class's target can be downgraded; an explicit per-request
   target can only be rejected.

The estimate's errors: it is a fluid bound (work divided evenly over workers, ignoring that a
unit runs on one worker and that units are batched); it ignores work that will arrive later
with an earlier deadline (optimistic, unless ``protect_admitted`` keeps such arrivals out);
protection charges every running unit before every protected request (pessimistic); for
``fcfs`` and ``chunked`` with ``fcfs`` order it under-counts, since they run all earlier
arrivals first, not only earlier deadlines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from .arrival_rates import ArrivalRates
from .events import Downgrade, Reject, WorkItem
from .predictor import TTFTPredictor
from .priority import slack_s
from .records import RequestRecord
from .slo import SLOClass, SLOConfig

AdmissionAction = Literal["admit", "reject", "downgrade"]
# The least ``queue_cost: measured`` prices a predicted second of waiting work at: a floor
# against a run of units that happened to run fast (a noisy or idle stretch).
MIN_QUEUE_COST = 0.5


class AdmissionConfig(BaseModel):
    """What to do with a request predicted to miss its TTFT SLO, and the waiting-queue bound."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: AdmissionAction = Field(
        "admit",
        description="on a predicted miss: admit anyway (FlowPrefill demotes late requests), "
        "reject (HTTP 429 with Retry-After), or downgrade to a looser SLO class (reject if "
        "none helps)",
    )
    estimate: Literal["alone", "queue"] = Field(
        "queue",
        description="how a miss is predicted: 'alone' = its own predicted prefill exceeds the "
        "time to its deadline; 'queue' = when no worker is idle, the predicted wait for "
        "earlier-deadline work (seconds, spread over the workers) plus its own prefill does",
    )
    protect_admitted: bool = Field(
        True,
        description="queue: also refuse a request whose predicted prefill would push an "
        "admitted waiting request due later past its deadline (under the same estimate)",
    )
    protect_units: bool = Field(
        False,
        description="queue, protect_admitted: protect requests whose units already run or "
        "are paused as well as waiting ones: refuse an arrival that would push a feasible "
        "unit due after it past its most urgent feasible member's deadline",
    )
    max_waiting: PositiveInt | None = Field(
        10_000,
        description="most requests WAITING in the policy (requests, not tokens); an arrival "
        "beyond it is rejected whatever 'action' says; None = unbounded",
    )
    retry_after_s: NonNegativeFloat = Field(
        1.0, description="Retry-After hint sent with a rejection, seconds"
    )
    reserve_for_tighter: bool = Field(
        False,
        description="queue: admit a request only if the work expected to arrive from "
        "tighter SLO classes before its deadline still fits (each class's recent arrival "
        "rate of predicted prefill); keeps a loose tenant's burst from filling the time a "
        "tight tenant needs",
    )
    reserve_cost: Literal["predicted", "measured"] = Field(
        "predicted",
        description="reserve_for_tighter: price a tighter class's expected work at its "
        "predicted prefill ('predicted'), or at that times what its requests' units have "
        "recently cost per predicted second ('measured': batched prompts share each "
        "forward's fixed cost, so a busy tight class costs less than its predictions sum to)",
    )
    queue_cost: Literal["predicted", "measured"] = Field(
        "predicted",
        description="queue: price waiting requests' work ahead of an arrival at their "
        "predicted prefill ('predicted'), or at that times what recent units of its own and "
        "tighter targets cost per predicted second, capped at 1 ('measured': batched prompts "
        "share each forward's fixed cost)",
    )
    reserve_window_s: PositiveFloat = Field(
        30.0,
        description="time constant of the per-class arrival-rate and cost estimates, seconds",
    )
    reserve_factor: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="reserve_for_tighter: room kept per unit of a tighter class's recent "
        "rate; above 1 leaves room for its bursts (work admitted now is due later, when the "
        "tight class may arrive faster than it has lately)",
    )
    overtake_looser: bool = Field(
        False,
        description="queue, flowprefill: admit a request that would be refused ahead of "
        "waiting requests of looser SLO classes when its own and tighter classes' work "
        "leaves it room; the looser requests it demotes behind feasible work may miss (tiering)",
    )
    overtaken: Literal["demote", "refuse"] = Field(
        "demote",
        description="overtake_looser: what happens to a looser waiting request an arrival "
        "overtakes: 'demote' behind all feasible work (served late, when a worker has nothing "
        "feasible), or 'refuse' it at once (HTTP 429 with Retry-After)",
    )
    max_overtaken: PositiveInt | None = Field(
        None,
        description="overtake_looser: most looser waiting requests one arrival may overtake; "
        "an arrival that would need more is refused instead (one refusal costs fewer "
        "requests than several demotions); None = no limit",
    )
    headroom: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="admit only if predicted to finish this fraction of its TTFT target "
        "before its deadline: a margin for what the predictions miss (a live runtime's "
        "dispatch gaps between units, noise); 0 = admit up to the deadline itself",
    )


class QueueEstimate(Protocol):
    """What the ``queue`` estimate asks of the policy (times in seconds)."""

    def work_ahead_s(self, deadline_s: float, now: float, waiting_cost: float = 1.0) -> float:
        """Predicted wait of a request due at ``deadline_s``: the work that runs before it,
        spread over the workers, waiting requests' share scaled by ``waiting_cost``."""
        ...

    def spare_work_s(self, deadline_s: float, now: float) -> float:
        """Seconds of prefill (on one worker) that a request due at ``deadline_s`` may add
        without pushing a protected admitted request due later past its deadline."""
        ...

    def tier_view(self, target_s: float) -> QueueEstimate | None:
        """The same estimate over waiting requests with targets up to ``target_s`` only
        (``overtake_looser``), or ``None`` when the policy cannot overtake."""

    @property
    def worker_count(self) -> int:
        """Prefill workers the work is spread over."""
        ...


@dataclass(frozen=True, slots=True)
class Overtake:
    """Admit the request ahead of looser classes (``overtake_looser``): at least ``work_s``
    seconds of predicted prefill of looser waiting requests due before it must move behind it
    (0: none is in its way; it only pushes looser requests due after it)."""

    work_s: float


class AdmissionControl:
    """Applies an ``AdmissionConfig`` to arrivals. ``slo`` gives the downgrade classes."""

    def __init__(self, config: AdmissionConfig, predictor: TTFTPredictor, slo: SLOConfig) -> None:
        self.config = config
        self.predictor = predictor
        self.slo = slo
        # Scaled classes, tightest first: the downgrade candidates in the order tried.
        self._classes: list[SLOClass] = sorted(
            (slo.resolve(name) for name in slo.class_names), key=lambda c: c.ttft_slo_s
        )
        self.arrivals = ArrivalRates(config.reserve_window_s)

    @property
    def classes(self) -> list[SLOClass]:
        """The policy's SLO classes (scaled), tightest first."""
        return self._classes

    @property
    def uses_queue_estimate(self) -> bool:
        """Whether arrivals need the waiting-work index (``queue`` estimate, not ``admit``)."""
        return self.config.action != "admit" and self.config.estimate == "queue"

    def queue_full(self, waiting: int) -> bool:
        """Whether ``waiting`` WAITING requests leave no room for an arrival."""
        bound = self.config.max_waiting
        return bound is not None and waiting >= bound

    def decide(
        self,
        rec: RequestRecord,
        now: float,
        waiting: int,
        saturated: bool,
        queue: QueueEstimate,
    ) -> Reject | Downgrade | Overtake | None:
        """The verdict on a new request at ``now`` (seconds): ``None`` admits it as it is.

        ``waiting``: requests WAITING before it; ``saturated``: no worker is idle; ``queue``
        is asked only when ``saturated`` under the ``queue`` estimate.
        """
        cfg = self.config
        rid = rec.request_id
        if self.queue_full(waiting):
            return Reject(
                rid,
                reason=f"the waiting queue is full: {waiting} requests are waiting "
                f"(admission.max_waiting = {cfg.max_waiting})",
                retry_after_s=cfg.retry_after_s,
            )
        if cfg.action == "admit":
            return None
        own_s = self.predictor.predict(rec.remaining_tokens)
        if cfg.reserve_for_tighter:
            # Every arrival, admitted or not, is demand the tight classes will bring again.
            self.arrivals.add(rec.ttft_slo_s, own_s, now)
        use_queue = saturated and cfg.estimate == "queue"
        miss = self._miss(
            rec.deadline_s - cfg.headroom * rec.ttft_slo_s,
            now,
            own_s,
            queue if use_queue else None,
            rec.ttft_slo_s,
        )
        if miss is None:
            return None
        if use_queue and cfg.overtake_looser:
            overtake = self._overtake(
                rec, rec.deadline_s - cfg.headroom * rec.ttft_slo_s, now, own_s, queue
            )
            if overtake is not None:
                return overtake
        if cfg.action == "downgrade":
            looser = self._looser_classes(rec)
            if looser is None:
                miss += "; an explicit TTFT target cannot be downgraded"
            else:
                for cls in looser:
                    deadline = rec.arrival_s + cls.ttft_slo_s * (1.0 - cfg.headroom)
                    estimate = queue if use_queue else None
                    if self._miss(deadline, now, own_s, estimate, cls.ttft_slo_s) is None:
                        return Downgrade(rid, cls.name, cls.ttft_slo_s)
                miss += "; no looser SLO class would make it"
        return Reject(rid, reason=miss, retry_after_s=cfg.retry_after_s)

    def _overtake(
        self,
        rec: RequestRecord,
        deadline_s: float,
        now: float,
        own_s: float,
        queue: QueueEstimate,
    ) -> Overtake | None:
        """``Overtake`` if ``rec`` (refused on the whole queue) fits when only its own and
        tighter classes wait, else None. Explicit targets and the loosest class never
        overtake."""
        if not self._looser_classes(rec):
            return None
        tier = queue.tier_view(rec.ttft_slo_s)
        if tier is None or self._miss(deadline_s, now, own_s, tier, rec.ttft_slo_s) is not None:
            return None
        cost = self.waiting_cost(rec.ttft_slo_s, now)
        wait_s = queue.work_ahead_s(deadline_s, now, cost)
        wait_s += self._reserved_s(deadline_s, now, queue)
        short_s = now + wait_s + own_s - deadline_s  # per worker, on the whole queue
        # Demotion frees predicted seconds; the shortfall is in discounted ones.
        return Overtake(max(short_s, 0.0) * queue.worker_count / cost)

    def waiting_cost(self, target_s: float, now: float) -> float:
        """What a predicted second of waiting work ahead of an arrival with ``target_s``
        costs (``queue_cost``): 1, or the measured ratio in [``MIN_QUEUE_COST``, 1]."""
        if self.config.queue_cost != "measured":
            return 1.0
        return min(1.0, max(MIN_QUEUE_COST, self.arrivals.cost_ratio_upto(target_s, now)))

    def _reserved_s(self, deadline_s: float, now: float, queue: QueueEstimate) -> float:
        """Seconds per worker kept for tighter classes before ``deadline_s``."""
        if not self.config.reserve_for_tighter:
            return 0.0
        measured = self.config.reserve_cost == "measured"
        reserved_s = self.arrivals.expected_tighter_s(deadline_s - now, now, measured)
        return reserved_s * self.config.reserve_factor / max(1, queue.worker_count)

    def _miss(
        self,
        deadline_s: float,
        now: float,
        own_s: float,
        queue: QueueEstimate | None,
        target_s: float,
    ) -> str | None:
        """Why a request due at ``deadline_s`` needing ``own_s`` seconds would miss, or None
        (``target_s``: its TTFT target, which prices the waiting work under ``queue_cost``)."""
        wait_s = 0.0
        if queue is not None:
            wait_s = queue.work_ahead_s(deadline_s, now, self.waiting_cost(target_s, now))
        reserved_s = self._reserved_s(deadline_s, now, queue) if queue is not None else 0.0
        if slack_s(deadline_s, now + wait_s + reserved_s, own_s) < 0.0:
            after = f" after {wait_s:.3f}s of earlier work" if queue is not None else ""
            if reserved_s > 0.0:
                after += f" and {reserved_s:.3f}s kept for tighter SLO classes"
            return (
                f"predicted to miss its TTFT deadline: prefill {own_s:.3f}s{after}, "
                f"{deadline_s - now:.3f}s left"
            )
        if queue is not None and self.config.protect_admitted:
            spare_s = queue.spare_work_s(deadline_s, now)
            if own_s > spare_s:
                return (
                    f"its prefill ({own_s:.3f}s) would push an admitted request past its "
                    f"deadline (room for {max(spare_s, 0.0):.3f}s before it)"
                )
        return None

    def unit_completed(
        self,
        items: Sequence[WorkItem],
        requests: Mapping[str, RequestRecord],
        executed_s: float,
        now: float,
    ) -> None:
        """A unit of ``items`` took ``executed_s`` of compute: each member's share (by
        predicted prefill) feeds ``reserve_cost`` and ``queue_cost: measured`` under its
        target on arrival."""
        cfg = self.config
        reserve = cfg.reserve_for_tighter and cfg.reserve_cost == "measured"
        if not (reserve or cfg.queue_cost == "measured"):
            return
        predicted = [self.predictor.predict(item.tokens) for item in items]
        total = sum(predicted)
        if total <= 0.0:
            return
        for item, own in zip(items, predicted, strict=True):
            target = requests[item.request_id].request.ttft_target_s
            self.arrivals.observe_cost(target, executed_s * own / total, own, now)

    def _looser_classes(self, rec: RequestRecord) -> list[SLOClass] | None:
        """Classes with a larger target than ``rec``'s, tightest first; ``None`` when the
        request's target is not its class's target (an explicit per-request target)."""
        own = next((c for c in self._classes if c.name == rec.slo_class), None)
        if own is None or not math.isclose(own.ttft_slo_s, rec.ttft_slo_s, rel_tol=1e-9):
            return None
        return [c for c in self._classes if c.ttft_slo_s > rec.ttft_slo_s]
