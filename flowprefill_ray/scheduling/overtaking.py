"""Tiering on demand: a tight-class arrival admitted ahead of looser classes' waiting work.

With ``admission.overtake_looser`` (admission.py), an arrival that the whole queue's estimate
refuses is tested again against its own and tighter classes only. That needs the waiting-work
index per tier: ``tier_work[T]`` holds the waiting requests whose target is at most ``T``, one
index per SLO class target but the loosest (whose tier is the whole queue: ``waiting_work``).

If it passes, looser waiting requests due before it are moved behind it, latest due first,
until the whole queue's estimate fits: each gets a *rank deadline* just after the newcomer's
(``RequestRecord.deadline_s``, re-keyed in the queue and the indexes) and an ``Overtaken``
decision names it. Its target in force is unchanged, so it is still judged by its own
deadline: if it misses, the timeline attributes it to the overtaking (``why_late.py``).

Latest due first, because those have the most time left to absorb the newcomer's prefill and
move the least: each lands a few milliseconds past the newcomer. Moving is exact in the
indexes (a remove and an add, O(log n)); finding the candidates scans the waiting requests
(O(n), n at most ``admission.max_waiting``), which happens only on an arrival the whole queue
refuses. FlowPrefill only: re-keying relies on its queue's lazily deleted entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from .events import Decision, Overtaken
from .waiting_work import BUCKET_S, WaitingWork

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
    _enqueue: Callable[[RequestRecord, float], None]

    def _init_overtaking(self) -> None:
        self.tier_work: dict[float, WaitingWork] = {}
        adm = self.config.admission
        if not (adm.overtake_looser and self.can_overtake and self.waiting_work is not None):
            return
        targets = sorted({c.ttft_slo_s for c in self.admission.classes})
        for target in targets[:-1]:
            self.tier_work[target] = WaitingWork(self.predictor, adm.headroom)
        self.counters["overtaken"] = 0

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

    def _overtake(self, rec: RequestRecord, work_s: float, now: float, out: list[Decision]):
        """Move looser waiting requests due before ``rec`` behind it, latest due first, until
        ``work_s`` seconds of their predicted prefill have moved (or none is left)."""
        index = self.waiting_work
        if work_s <= 0.0 or index is None:
            return
        headroom = self.config.admission.headroom
        due = rec.deadline_s - headroom * rec.ttft_slo_s  # where it stands in the indexes

        def indexed_due(v: RequestRecord) -> float:
            return v.deadline_s - headroom * v.ttft_slo_s

        candidates = [
            v
            for v in map(self.requests.__getitem__, index.request_ids())
            if v.ttft_slo_s > rec.ttft_slo_s and indexed_due(v) <= due
        ]
        # Latest due first; among equals, the latest queued (the order the queue serves them).
        candidates.sort(key=lambda v: (indexed_due(v), v.tiebreak), reverse=True)
        moved = 0.0
        for v in candidates:
            if moved >= work_s:
                break
            moved += self.predictor.predict(v.remaining_tokens)
            # One bucket past the newcomer in the indexes, hence after it in the queue too.
            v.deadline_s = due + headroom * v.ttft_slo_s + BUCKET_S
            index.add(v, now)  # replaces its entry
            self._tiers_add(v, now)
            self._enqueue(v, now)  # a fresh queue entry; the old one goes stale
            self.counters["overtaken"] += 1
            out.append(Overtaken(v.request_id, rec.request_id, v.deadline_s))


class _TierView:
    """``QueueEstimate`` (admission.py) with one tier's index in place of the whole queue's:
    units (running, paused) count whatever their members' classes."""

    __slots__ = ("_index", "_policy")

    def __init__(self, policy: WorkEstimates, index: WaitingWork) -> None:
        self._policy = policy
        self._index = index

    def work_ahead_s(self, deadline_s: float, now: float) -> float:
        return self._policy.work_ahead_s(deadline_s, now, self._index)

    def spare_work_s(self, deadline_s: float, now: float) -> float:
        return self._policy.spare_work_s(deadline_s, now, self._index)

    def tier_view(self, target_s: float) -> None:
        return None

    @property
    def worker_count(self) -> int:
        return self._policy.worker_count
