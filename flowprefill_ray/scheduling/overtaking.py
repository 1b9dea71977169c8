"""Tiering on demand: a tight-class arrival admitted at the expense of looser waiting work.

With ``admission.overtake_looser`` (admission.py), an arrival that the whole queue's estimate
refuses is tested again against its own and tighter classes only. That needs the waiting-work
index per tier: ``tier_work[T]`` holds the waiting requests whose target is at most ``T``, one
index per SLO class target but the loosest (whose tier is the whole queue: ``waiting_work``).

If it passes, looser waiting requests due before it are *demoted*, largest first, until the
whole queue's estimate fits: each leaves the indexes and joins FlowPrefill's late requests
for good (served only when nothing feasible waits; ``RequestRecord.overtaken`` keeps a fall
of the online correction from making it feasible again), and an ``Overtaken`` decision names
it. It stays admitted and is still judged by its own target; if it misses, the timeline
attributes the miss to the overtaking (``why_late.py``). With ``admission.overtaken:
refuse`` it is refused instead (``Reject`` after the ``Overtaken``, HTTP 429): live, no
demoted request met its target (0 of 44 on the two-tenant replay), and each served late
took compute - its prefill when the worker found nothing feasible, and its decode on the
shared cores all along - from the requests that could still make theirs.

Why demote rather than only move them behind the newcomer: a request moved behind it had, by
the same estimate, little chance left of its own deadline, yet kept its rank over every
looser request that still had one. In the two-tenant simulation that cascade cost the
relaxed tenant up to a third of its attainment and the run a fifth of its goodput (commit
df0c68d, docs/results/overtake_move_sim.json). Largest first, because each demoted request is one miss:
the fewest requests free the room.

``admission.max_overtaken`` bounds the trade: an arrival whose room would take more demotions
than that is refused instead (``_overtake_capped``), since each demotion is a likely miss and
the refusal only one.

Finding the candidates scans the waiting requests (O(n), n at most ``admission.max_waiting``),
only on an arrival the whole queue refuses; each demotion is O(log n). FlowPrefill only: it
is the policy with a late queue to demote into.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from .events import Decision, Overtaken
from .waiting_work import WaitingWork

if TYPE_CHECKING:
    from .admission import AdmissionControl
    from .config import PolicyConfig
    from .predictor import TTFTPredictor
    from .records import RequestRecord
    from .work_estimates import WorkEstimates


class Overtaking:
    """Mixed into ``Policy`` (policy.py), whose state it reads and re-keys."""

    # Whether the policy's queue can re-key a waiting request (set by FlowPrefill).
    can_overtake: ClassVar[bool] = False

    # Provided by Policy.
    config: PolicyConfig
    predictor: TTFTPredictor
    admission: AdmissionControl
    waiting_work: WaitingWork | None
    requests: dict[str, RequestRecord]
    counters: dict[str, int]
    _demote: Callable[[RequestRecord], None]  # FlowPrefill's: into the late queue for good
    _refuse_admitted: Callable[[RequestRecord, str, list[Decision]], None]

    def _init_overtaking(self) -> None:
        self.tier_work: dict[float, WaitingWork] = {}
        adm = self.config.admission
        if not (adm.overtake_looser and self.can_overtake and self.waiting_work is not None):
            return
        targets = sorted({c.ttft_slo_s for c in self.admission.classes})
        for target in targets[:-1]:
            self.tier_work[target] = WaitingWork(self.predictor, adm.headroom)
        self.counters["overtaken"] = 0
        self.counters["overtakes_capped"] = 0  # arrivals refused by admission.max_overtaken

    def tier_view(self, target_s: float) -> _TierView | None:
        """The admission estimate over waiting requests with targets up to ``target_s``."""
        for target, index in self.tier_work.items():
            if math.isclose(target, target_s, rel_tol=1e-9):
                return _TierView(self, index)  # type: ignore[arg-type]  # a Policy
        return None

    def _tiers_add(self, rec: RequestRecord, now: float) -> None:
        for target, index in self.tier_work.items():
            if rec.ttft_slo_s <= target * (1.0 + 1e-9):
                index.add(rec, now)

    def _tiers_remove(self, request_id: str) -> None:
        for index in self.tier_work.values():
            index.remove(request_id)

    def _to_overtake(self, rec: RequestRecord, work_s: float) -> list[RequestRecord]:
        """The looser waiting requests due before ``rec`` that make way for it: largest
        first, until ``work_s`` seconds of their predicted prefill are out of its way (or
        none is left)."""
        index = self.waiting_work
        if work_s <= 0.0 or index is None:
            return []
        headroom = self.config.admission.headroom
        due = rec.deadline_s - headroom * rec.ttft_slo_s  # where it stands in the indexes
        predict = self.predictor.predict
        candidates = [
            (predict(v.remaining_tokens), v.tiebreak, v)
            for v in map(self.requests.__getitem__, index.request_ids())
            if v.ttft_slo_s > rec.ttft_slo_s and v.deadline_s - headroom * v.ttft_slo_s <= due
        ]
        # Largest first; among equals the latest queued (the last the queue would serve).
        candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
        chosen: list[RequestRecord] = []
        freed = 0.0
        for work, _, v in candidates:
            if freed >= work_s:
                break
            freed += work
            chosen.append(v)
        return chosen

    def _overtake(
        self, rec: RequestRecord, victims: list[RequestRecord], now: float, out: list[Decision]
    ) -> None:
        """Demote (or refuse) ``victims`` (``_to_overtake``'s) in favour of ``rec``."""
        refuse = self.config.admission.overtaken == "refuse"
        for v in victims:
            v.overtaken = True
            self.counters["overtaken"] += 1
            out.append(Overtaken(v.request_id, rec.request_id))
            if refuse:
                self._refuse_overtaken(v, rec, now, out)
                continue
            assert self.waiting_work is not None  # victims come from it
            self.waiting_work.remove(v.request_id)
            self._tiers_remove(v.request_id)
            self._demote(v)

    def _overtake_capped(self, rec: RequestRecord, victims: list[RequestRecord]) -> str | None:
        """Why ``rec`` is refused rather than overtaking ``victims`` (more than
        ``admission.max_overtaken``), or None when it may overtake them."""
        cap = self.config.admission.max_overtaken
        if cap is None or len(victims) <= cap:
            return None
        self.counters["overtakes_capped"] += 1
        return (
            f"predicted to miss its {rec.ttft_slo_s:g} s TTFT target behind the work already "
            f"queued, and making room would push {len(victims)} requests of looser classes "
            f"past theirs (admission.max_overtaken = {cap})"
        )

    def _refuse_overtaken(
        self, v: RequestRecord, by: RequestRecord, now: float, out: list[Decision]
    ) -> None:
        reason = (
            f"refused {now - v.arrival_s:.1f} s after arrival: a request with a "
            f"tighter TTFT target ({by.ttft_slo_s:g} s) took its place and it was "
            f"predicted to miss its own {v.ttft_slo_s:g} s target (the server is "
            "overloaded; admission.overtaken = refuse)"
        )
        self._refuse_admitted(v, reason, out)  # leaves the waiting indexes too


class _TierView:
    """``QueueEstimate`` (admission.py) with one tier's index in place of the whole queue's:
    units (running, paused) count whatever their members' classes."""

    __slots__ = ("_index", "_policy")

    def __init__(self, policy: WorkEstimates, index: WaitingWork) -> None:
        self._policy = policy
        self._index = index

    def work_ahead_s(self, deadline_s: float, now: float, waiting_cost: float = 1.0) -> float:
        return self._policy.work_ahead_s(deadline_s, now, waiting_cost, self._index)

    def spare_work_s(self, deadline_s: float, now: float) -> float:
        return self._policy.spare_work_s(deadline_s, now, self._index)

    def tier_view(self, target_s: float) -> None:
        return None

    @property
    def worker_count(self) -> int:
        return self._policy.worker_count
