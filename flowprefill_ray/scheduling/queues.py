"""Waiting queues with lazy deletion.

A request leaves a queue by being popped, or by becoming stale: its status is no longer
WAITING (cancelled, started) or its ``queue_token`` no longer matches the entry (it was
re-queued under a new entry). Stale entries are skipped when they reach the top, so removal
costs nothing at the time it happens.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from .predictor import TTFTPredictor
from .records import RequestRecord
from .request import RequestStatus

_WAITING = RequestStatus.WAITING


class _Tokens:
    """Entry ids; shared so that an entry from any queue of one policy is unique."""

    def __init__(self) -> None:
        self._next = 1

    def __call__(self) -> int:
        token = self._next
        self._next += 1
        return token


class KeyedQueue:
    """Waiting requests ordered by ``key(rec)`` (smallest first), ties on ``rec.tiebreak``."""

    def __init__(self, key: Callable[[RequestRecord], Any]) -> None:
        self._key = key
        self._heap: list[tuple[Any, tuple[int, int], int, RequestRecord]] = []
        self._token = _Tokens()

    def push(self, rec: RequestRecord) -> None:
        token = self._token()
        rec.queue_token = token
        heapq.heappush(self._heap, (self._key(rec), rec.tiebreak, token, rec))

    def peek(self) -> RequestRecord | None:
        heap = self._heap
        while heap:
            _, _, token, rec = heap[0]
            if rec.queue_token == token and rec.status is _WAITING:
                return rec
            heapq.heappop(heap)
        return None

    def pop(self) -> RequestRecord | None:
        rec = self.peek()
        if rec is not None:
            heapq.heappop(self._heap)
            rec.queue_token = 0
        return rec


class _FeasibleLateHeaps:
    """One pair of heaps: feasible requests by earliest deadline, late ones by latest."""

    __slots__ = ("feasible", "late")

    def __init__(self) -> None:
        self.feasible: list[tuple[float, tuple[int, int], int, RequestRecord]] = []
        self.late: list[tuple[float, tuple[int, int], int, RequestRecord]] = []


class SlackQueue:
    """Waiting requests in FlowPrefill priority order, without rescoring every request.

    While a request waits its remaining work is fixed, so its slack
    ``deadline - now - predict(remaining)`` only falls as ``now`` grows. Feasible requests
    (slack >= 0) therefore sit in a heap by earliest deadline; the top is checked when it is
    looked at and, once late, moves for good to a second heap ordered by latest deadline. The
    first feasible top is the best feasible request (every earlier deadline was checked and
    found late), and late requests rank after all feasible ones, so popping gives exactly the
    order of a full rescan at the same ``now``.

    Requests of at most ``small_tokens`` tokens live in their own pair of heaps, so that SLO
    batching, which only ever adds small requests, can walk them in priority order
    (``pop_small``) without popping every large request in between; ``peek``/``pop`` merge
    the two pairs.

    The one thing that can make a late request feasible again is the predictor's online
    correction falling. The late heaps are re-checked whenever the correction has fallen by
    more than ``rescore_threshold`` (a fraction) since the last check; with 0 the order is
    exact, with a small positive value a request within that margin of feasibility may stay
    demoted until the next check. A re-check visits only late requests whose deadline has not
    passed (a request past its deadline is late for good), so it costs O(k log n) for the k
    requests that arrived within about one SLO of ``now``, not O(n).
    """

    def __init__(
        self, predictor: TTFTPredictor, small_tokens: int, rescore_threshold: float = 0.0
    ) -> None:
        self._predictor = predictor
        self._small_tokens = small_tokens
        self._threshold = rescore_threshold
        self._small = _FeasibleLateHeaps()
        self._large = _FeasibleLateHeaps()
        self._token = _Tokens()
        self._reference_correction = _scale(predictor)
        self._seen_correction = _scale(predictor)  # skip the check until it changes
        self.rescores = 0  # how often the late heaps were re-checked

    def slack_s(self, rec: RequestRecord, now: float) -> float:
        """Slack of a waiting request at ``now``, seconds."""
        predicted = self._predictor.predict(rec.remaining_tokens)
        remaining = predicted - rec.executed_s
        return (rec.deadline_s - now) - (remaining if remaining > 0.0 else 0.0)

    def _heaps_of(self, rec: RequestRecord) -> _FeasibleLateHeaps:
        small = rec.remaining_tokens <= self._small_tokens
        return self._small if small else self._large

    def push(self, rec: RequestRecord, now: float) -> None:
        """Queue a waiting request, scoring it at ``now``."""
        rec.queue_late = self.slack_s(rec, now) < 0.0
        self.unpop(rec)

    def demote(self, rec: RequestRecord) -> None:
        """Queue a waiting request as late whatever its slack, for good: a request a
        tighter class overtook (overtaking.py) is served only when nothing feasible waits."""
        rec.queue_late = True
        self.unpop(rec)

    def unpop(self, rec: RequestRecord) -> None:
        """Put back a request popped during this same event, where it was (no rescoring:
        its slack has not changed since)."""
        token = self._token()
        rec.queue_token = token
        heaps = self._heaps_of(rec)
        if rec.queue_late:
            heapq.heappush(heaps.late, (-rec.deadline_s, rec.tiebreak, token, rec))
        else:
            heapq.heappush(heaps.feasible, (rec.deadline_s, rec.tiebreak, token, rec))

    def _check_correction(self, now: float) -> None:
        correction, overhead = scale = _scale(self._predictor)
        self._seen_correction = scale
        ref_correction, ref_overhead = self._reference_correction
        keep = 1.0 - self._threshold
        # The overhead moves by fractions of a millisecond on every completion; a fall that
        # small can turn only requests late by less than that feasible again, not worth a
        # re-check of the late heap per event (it made completions 10x slower at 10,000
        # queued in benchmarks/scheduler_overhead.py).
        overhead_floor = min(ref_overhead * keep, ref_overhead - _OVERHEAD_RESCORE_S)
        if correction >= ref_correction * keep and overhead >= overhead_floor:
            # Requests judged late at a lower scale are later still: nothing to redo.
            self._reference_correction = (
                max(correction, ref_correction),
                max(overhead, ref_overhead),
            )
        else:
            self._reference_correction = scale
            self.rescores += 1
            for heaps in (self._small, self._large):
                # Only requests whose deadline has not passed can turn feasible; the late
                # heap holds them first (latest deadline on top), so the walk stops early.
                late = heaps.late
                again: list[RequestRecord] = []
                kept: list[RequestRecord] = []
                while late and -late[0][0] >= now:
                    _, _, token, rec = heapq.heappop(late)
                    if rec.queue_token == token and rec.status is _WAITING:
                        if rec.overtaken:  # demoted for good; keep it where it was
                            kept.append(rec)
                        else:
                            again.append(rec)
                for rec in again:
                    self.push(rec, now)
                for rec in kept:
                    self.unpop(rec)

    def _top(self, heaps: _FeasibleLateHeaps, now: float) -> RequestRecord | None:
        """The best valid request of one pair (``rec.queue_late`` says which heap)."""
        feasible = heaps.feasible
        while feasible:
            entry = feasible[0]
            rec = entry[3]
            if rec.queue_token != entry[2] or rec.status is not _WAITING:
                heapq.heappop(feasible)
            elif self.slack_s(rec, now) < 0.0:
                heapq.heappop(feasible)
                rec.queue_late = True
                heapq.heappush(heaps.late, (-rec.deadline_s, entry[1], entry[2], rec))
            else:
                return rec
        late = heaps.late
        while late:
            entry = late[0]
            rec = entry[3]
            if rec.queue_token == entry[2] and rec.status is _WAITING:
                return rec
            heapq.heappop(late)
        return None

    def _best(self, now: float) -> tuple[RequestRecord, _FeasibleLateHeaps] | None:
        if _scale(self._predictor) != self._seen_correction:
            self._check_correction(now)
        small = self._top(self._small, now)
        large = self._top(self._large, now)
        if small is None:
            return None if large is None else (large, self._large)
        if large is None or _ranks_before(small, large):
            return small, self._small
        return large, self._large

    def peek(self, now: float) -> tuple[RequestRecord, bool] | None:
        """The best waiting request at ``now`` and whether it is feasible, or ``None``."""
        best = self._best(now)
        if best is None:
            return None
        return best[0], not best[0].queue_late

    def pop(self, now: float) -> RequestRecord | None:
        """Remove and return the best waiting request at ``now``."""
        best = self._best(now)
        if best is None:
            return None
        rec, heaps = best
        heapq.heappop(heaps.late if rec.queue_late else heaps.feasible)
        rec.queue_token = 0
        return rec

    def pop_small(self, now: float) -> RequestRecord | None:
        """Remove and return the best waiting request of at most ``small_tokens`` tokens."""
        if _scale(self._predictor) != self._seen_correction:
            self._check_correction(now)
        rec = self._top(self._small, now)
        if rec is not None:
            heapq.heappop(self._small.late if rec.queue_late else self._small.feasible)
            rec.queue_token = 0
        return rec

    def in_order(self, now: float) -> list[RequestRecord]:
        """Every waiting request in priority order at ``now`` (O(n log n): tests, debugging)."""
        taken: list[RequestRecord] = []
        while (rec := self.pop(now)) is not None:
            taken.append(rec)
        for rec in taken:
            self.unpop(rec)
        return taken


# A fall of the per-unit overhead smaller than this (seconds) re-scores no late request.
_OVERHEAD_RESCORE_S = 0.002


def _scale(predictor: TTFTPredictor) -> tuple[float, float]:
    """What moves every prediction at once: the online correction and the per-unit overhead.
    A fall of either can make late requests feasible again."""
    return predictor.correction, predictor.unit_overhead_s


def _ranks_before(a: RequestRecord, b: RequestRecord) -> bool:
    """Whether queued request ``a`` ranks before ``b`` (their ``queue_late`` flags current)."""
    if a.queue_late != b.queue_late:
        return b.queue_late
    if a.queue_late:
        return (-a.deadline_s, a.tiebreak) < (-b.deadline_s, b.tiebreak)
    return (a.deadline_s, a.tiebreak) < (b.deadline_s, b.tiebreak)
