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


class SlackQueue:
    """Waiting requests in FlowPrefill priority order, without rescoring every request.

    While a request waits its remaining work is fixed, so its slack
    ``deadline - now - predict(remaining)`` only falls as ``now`` grows. Feasible requests
    (slack >= 0) therefore sit in a heap by earliest deadline; the top is checked when it is
    looked at and, once late, moves for good to a second heap ordered by latest deadline. The
    first feasible top is the best feasible request (every earlier deadline was checked and
    found late), and late requests rank after all feasible ones, so popping gives exactly the
    order of a full rescan at the same ``now``.

    The one thing that can make a late request feasible again is the predictor's online
    correction falling. The late heap is re-checked whenever the correction has fallen by
    more than ``rescore_threshold`` (a fraction) since the last check; with 0 the order is
    exact, with a small positive value a request within that margin of feasibility may stay
    demoted until the next check, which keeps the common path O(log n).
    """

    def __init__(self, predictor: TTFTPredictor, rescore_threshold: float = 0.0) -> None:
        self._predictor = predictor
        self._threshold = rescore_threshold
        self._feasible: list[tuple[float, tuple[int, int], int, RequestRecord]] = []
        self._late: list[tuple[float, tuple[int, int], int, RequestRecord]] = []
        self._token = _Tokens()
        self._reference_correction = predictor.correction
        self.rescores = 0  # how often the late heap was re-checked

    def slack_s(self, rec: RequestRecord, now: float) -> float:
        """Slack of a waiting request at ``now``, seconds."""
        predicted = self._predictor.predict(rec.prompt_tokens - rec.prefilled_tokens)
        remaining = predicted - rec.executed_s
        return (rec.deadline_s - now) - (remaining if remaining > 0.0 else 0.0)

    def push(self, rec: RequestRecord, now: float) -> None:
        token = self._token()
        rec.queue_token = token
        if self.slack_s(rec, now) >= 0.0:
            heapq.heappush(self._feasible, (rec.deadline_s, rec.tiebreak, token, rec))
        else:
            heapq.heappush(self._late, (-rec.deadline_s, rec.tiebreak, token, rec))

    def _check_correction(self, now: float) -> None:
        correction = self._predictor.correction
        reference = self._reference_correction
        if correction > reference:
            # Requests judged late at a lower correction are later still: nothing to redo.
            self._reference_correction = correction
        elif correction < reference * (1.0 - self._threshold):
            self._reference_correction = correction
            self.rescores += 1
            late, self._late = self._late, []
            for _, _, token, rec in late:
                if rec.queue_token == token and rec.status is _WAITING:
                    self.push(rec, now)

    def peek(self, now: float) -> tuple[RequestRecord, bool] | None:
        """The best waiting request at ``now`` and whether it is feasible, or ``None``."""
        if self._predictor.correction != self._reference_correction:
            self._check_correction(now)
        feasible = self._feasible
        while feasible:
            _, tiebreak, token, rec = feasible[0]
            if rec.queue_token != token or rec.status is not _WAITING:
                heapq.heappop(feasible)
            elif self.slack_s(rec, now) < 0.0:
                heapq.heappop(feasible)
                heapq.heappush(self._late, (-rec.deadline_s, tiebreak, token, rec))
            else:
                return rec, True
        late = self._late
        while late:
            _, _, token, rec = late[0]
            if rec.queue_token == token and rec.status is _WAITING:
                return rec, False
            heapq.heappop(late)
        return None

    def pop(self, now: float) -> RequestRecord | None:
        """Remove and return the best waiting request at ``now``."""
        top = self.peek(now)
        if top is None:
            return None
        rec, feasible = top
        heapq.heappop(self._feasible if feasible else self._late)
        rec.queue_token = 0
        return rec

    def in_order(self, now: float) -> list[RequestRecord]:
        """Every waiting request in priority order at ``now`` (O(n log n): tests, debugging)."""
        taken: list[RequestRecord] = []
        while (rec := self.pop(now)) is not None:
            taken.append(rec)
        for rec in taken:
            self.push(rec, now)
        return taken
