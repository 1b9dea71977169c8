"""Predicted prefill work of the waiting requests, summed by deadline (admission control).

The ``queue`` admission estimate asks, on every arrival: how many seconds of predicted prefill
belong to waiting requests that are still feasible and whose deadline is no later than ``D``?
Under earliest-deadline-first those run before a newcomer with deadline ``D``. Scanning the
queue would cost O(n) per arrival; this index answers in O(log K) (amortised):

- A waiting request's remaining work is fixed while it waits, so its **latest start**
  ``deadline - predicted`` is fixed too, and it is feasible exactly while ``now <= latest
  start``. A min-heap by latest start drops each request from the index once, when it turns
  late (late requests rank after every feasible one, so they do not run before a newcomer).
- The feasible ones are summed per **deadline bucket** of ``BUCKET_S`` (1 ms) in a Fenwick tree
  over a ring of ``BUCKETS`` (65,536) buckets, i.e. a 65.5 s horizon. Every indexed deadline
  lies in ``[now, now + horizon)`` (a request past its deadline is late), so bucket ``b``
  lives in slot ``b mod BUCKETS`` without collisions. Deadlines beyond the horizon (explicit
  targets over a minute) wait in a side heap and move into the ring as time advances.
- Work is kept as integer nanoseconds of the *uncorrected* prediction and multiplied by the
  predictor's current online correction when asked, so sums never drift and follow the
  correction at once.

Approximations (both are small and documented in SCHEDULING.md): a query counts whole
buckets, so requests whose deadline is up to 1 ms after ``D`` are counted as before it; and a
request's latest start is computed with the correction at the time it was queued, so after
the correction moves it may leave the index somewhat early or late.

Time must not run backwards for one index (both policy drivers use a monotonic clock); an
earlier ``now`` is treated as the latest one seen.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from .predictor import TTFTPredictor
from .records import RequestRecord

BUCKET_S = 0.001  # deadline resolution of the index, seconds
BUCKETS = 1 << 16  # ring size: the horizon is BUCKETS * BUCKET_S = 65.5 s
_NS = 1_000_000_000


class _RingFenwick:
    """A Fenwick tree of integers over ``size`` slots: point add, prefix sum in O(log size)."""

    __slots__ = ("_size", "_tree", "total")

    def __init__(self, size: int) -> None:
        self._size = size
        self._tree = [0] * (size + 1)
        self.total = 0

    def add(self, slot: int, value: int) -> None:
        tree, size = self._tree, self._size
        i = slot + 1
        while i <= size:
            tree[i] += value
            i += i & -i
        self.total += value

    def prefix(self, slot: int) -> int:
        """Sum of slots ``0..slot`` (0 when ``slot < 0``)."""
        tree = self._tree
        i = slot + 1
        total = 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def window_sum(self, first: int, last: int) -> int:
        """Sum of absolute buckets ``first..last`` (``0 <= last - first < size``) on the ring."""
        size = self._size
        a, b = first % size, last % size
        if a <= b:
            return self.prefix(b) - self.prefix(a - 1)
        return self.total - (self.prefix(a - 1) - self.prefix(b))


@dataclass(slots=True, eq=False)
class _Entry:
    bucket: int  # absolute deadline bucket
    work_ns: int  # uncorrected predicted prefill, integer nanoseconds
    deadline_s: float
    in_ring: bool = False  # False while beyond the horizon (in the side heap)
    live: bool = True  # False once removed (heap entries are deleted lazily)


class WaitingWork:
    """Index of waiting, still-feasible requests' predicted prefill by deadline."""

    def __init__(self, predictor: TTFTPredictor) -> None:
        self._predictor = predictor
        self._ring = _RingFenwick(BUCKETS)
        self._entries: dict[str, _Entry] = {}
        self._by_latest_start: list[tuple[float, int, str, _Entry]] = []
        self._beyond_horizon: list[tuple[int, int, str, _Entry]] = []
        self._seq = 0
        self._now = 0.0
        self._window = 0  # first bucket of the ring window: the bucket of the latest `now`

    def __len__(self) -> int:
        """Requests indexed (waiting and not yet late)."""
        return len(self._entries)

    def add(self, rec: RequestRecord, now: float) -> None:
        """Index a request that has just become WAITING (a late one is not indexed)."""
        self._advance(now)
        base_s = self._predictor.predict_uncorrected(rec.remaining_tokens)
        remaining = base_s * self._predictor.correction - rec.executed_s
        latest_start = rec.deadline_s - (remaining if remaining > 0.0 else 0.0)
        if latest_start < self._now:
            return
        self.remove(rec.request_id)  # a re-queued request replaces its old entry
        entry = _Entry(math.floor(rec.deadline_s / BUCKET_S), round(base_s * _NS), rec.deadline_s)
        self._entries[rec.request_id] = entry
        self._seq += 1
        heapq.heappush(self._by_latest_start, (latest_start, self._seq, rec.request_id, entry))
        if entry.bucket < self._window + BUCKETS:
            self._into_ring(entry)
        else:
            heapq.heappush(self._beyond_horizon, (entry.bucket, self._seq, rec.request_id, entry))

    def remove(self, request_id: str) -> None:
        """Forget a request that left WAITING (started, cancelled); no-op if not indexed."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        entry.live = False
        if entry.in_ring:
            self._ring.add(entry.bucket % BUCKETS, -entry.work_ns)

    def work_before_s(self, deadline_s: float, now: float) -> float:
        """Predicted prefill seconds (current correction) of indexed requests that are
        feasible at ``now`` and due no later than ``deadline_s`` (to the bucket)."""
        self._advance(now)
        last = math.floor(deadline_s / BUCKET_S)
        if last < self._window:
            return 0.0
        if last - self._window < BUCKETS:
            total_ns = self._ring.window_sum(self._window, last)
        else:
            # Beyond the horizon: the whole ring plus the few far entries due by then.
            total_ns = self._ring.total + sum(
                e.work_ns for _, _, _, e in self._beyond_horizon if e.live and e.bucket <= last
            )
        return total_ns / _NS * self._predictor.correction

    def _into_ring(self, entry: _Entry) -> None:
        entry.in_ring = True
        self._ring.add(entry.bucket % BUCKETS, entry.work_ns)

    def _advance(self, now: float) -> None:
        """Drop requests that turned late by ``now``; slide the ring window forward."""
        if now > self._now:
            self._now = now
            self._window = max(self._window, math.floor(now / BUCKET_S))
        now = self._now
        by_start = self._by_latest_start
        while by_start and by_start[0][0] < now:
            _, _, rid, entry = heapq.heappop(by_start)
            if entry.live:
                self.remove(rid)
        # Every ring entry is due in [now, now + horizon): its deadline is at least its latest
        # start, which is at least `now` after the loop above. Far entries come in as the
        # window reaches them.
        far = self._beyond_horizon
        horizon_end = self._window + BUCKETS
        while far and far[0][0] < horizon_end:
            _, _, _, entry = heapq.heappop(far)
            if entry.live:
                self._into_ring(entry)
