"""Predicted prefill work of the waiting requests, by deadline (admission control's index).

The ``queue`` admission estimate asks two things on every arrival of a request due at ``D``:

1. how many seconds of predicted prefill belong to waiting, still-feasible requests due no
   later than ``D`` (under earliest-deadline-first they run before it): ``work_before_s``;
2. how much work could still be added before ``D`` without pushing an admitted request due
   after ``D`` past its deadline: ``spare_work_s``, the smallest ``(deadline_j - now) *
   workers - busy - (work due no later than j)`` over the later requests ``j``.

Scanning the queue would cost O(n) per arrival. Here both answers take O(log K):

- A waiting request's remaining work is fixed while it waits, so its **latest start**
  ``deadline - predicted`` is fixed too, and it is feasible exactly while ``now <= latest
  start``. A min-heap by latest start drops each request from the index once, when it turns
  late (late requests rank after every feasible one, so they run after any newcomer).
- Requests are summed per **deadline bucket** of ``BUCKET_S`` (2**-10 s, about 1 ms) on a ring
  of ``BUCKETS`` (65,536) buckets, a 64 s horizon. Every indexed deadline lies in ``[now, now +
  horizon)`` (a request past its deadline is late), so bucket ``b`` lives in slot ``b mod
  BUCKETS`` without collisions. Deadlines beyond the horizon (explicit targets over a minute)
  wait in a side heap and move onto the ring as time advances.
- A segment tree over the ring keeps, per node, the work of its buckets and the minimum over
  its protected buckets of ``start(b) * workers - (work of the node's buckets up to b)``; the
  combination ``(sum_l + sum_r, min(min_l, min_r - sum_l))`` needs no lazy propagation, so an
  update is one leaf plus its ancestors.
- A request that the estimate itself already gives up on (its spare is negative even without
  a newcomer: admitted on an optimistic estimate, or overtaken by running work) would block
  every earlier-deadline arrival until it turns late; it is therefore **unprotected** (its
  work still counts in the sums, it just no longer vetoes arrivals). ``spare_work_s`` finds
  such buckets by descending the tree, so each request is unprotected at most once.

With a ``headroom`` h (``AdmissionConfig.headroom``) every request stands in the index at
``deadline - h x target`` instead of its deadline: it leaves the index once it can no longer
make that, and protection keeps that margin for it. h = 0 is the plain rule above.

Approximations (documented in SCHEDULING.md): deadlines are rounded down to their bucket
(requests due within one bucket of ``D`` count as before it; protection asks a request to
finish by the start of its bucket); work is predicted with the online correction in force when
the request was queued; the number of workers is fixed into the tree (a change rebuilds the
occupied buckets). Time must not run backwards for one index (both policy drivers use a
monotonic clock); an earlier ``now`` is treated as the latest one seen.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from .predictor import TTFTPredictor
from .records import RequestRecord

BUCKET_S = 2.0**-10  # deadline resolution, seconds (a power of two: bucket arithmetic is exact)
BUCKETS = 1 << 16  # ring size: the horizon is BUCKETS * BUCKET_S = 64 s
_NS = 1_000_000_000
_INF = math.inf


class _RingTree:
    """Segment tree over ``size`` ring slots (``size`` a power of two). Node ``i`` holds
    ``work[i]`` (integer ns of its slots) and ``low[i]``: the minimum, over its protected
    slots ``b``, of ``start(b) * workers - (work of its slots from its first up to b)``,
    in seconds (``inf`` if none)."""

    __slots__ = ("bucket", "low", "protected", "size", "slot_ns", "version", "work", "workers")

    def __init__(self, size: int) -> None:
        self.size = size
        self.work = [0] * (2 * size)
        self.low = [_INF] * (2 * size)
        self.slot_ns = [0] * size
        self.protected = [0] * size  # protected requests per slot
        self.bucket = [0] * size  # absolute bucket of the requests in each slot
        self.workers = 1
        self.version = 0  # bumped on every change: lets a caller reuse a query's answer

    def refresh(self, slot: int) -> None:
        """Recompute leaf ``slot`` and its ancestors from the slot's contents."""
        self.version += 1
        work, low = self.work, self.low
        i = slot + self.size
        ns = self.slot_ns[slot]
        work[i] = ns
        low[i] = (
            self.bucket[slot] * BUCKET_S * self.workers - ns / _NS if self.protected[slot] else _INF
        )
        i >>= 1
        while i:
            left = 2 * i
            work[i] = work[left] + work[left + 1]
            low_right = low[left + 1] - work[left] / _NS
            low[i] = low[left] if low[left] < low_right else low_right
            i >>= 1

    def nodes(self, first: int, last: int) -> list[int]:
        """The O(log size) nodes covering slots ``first..last``, left to right."""
        left: list[int] = []
        right: list[int] = []
        lo, hi = first + self.size, last + self.size + 1
        while lo < hi:
            if lo & 1:
                left.append(lo)
                lo += 1
            if hi & 1:
                hi -= 1
                right.append(hi)
            lo >>= 1
            hi >>= 1
        left.extend(reversed(right))
        return left

    def query(self, first: int, last: int) -> tuple[int, float]:
        """``(work ns, low)`` of slots ``first..last`` (``first <= last``), ``low`` relative
        to the work before ``first``."""
        work, low = self.work, self.low
        total_ns, lowest = 0, _INF
        for node in self.nodes(first, last):
            candidate = low[node] - total_ns / _NS
            if candidate < lowest:
                lowest = candidate
            total_ns += work[node]
        return total_ns, lowest

    def first_below(self, first: int, last: int, floor: float) -> int | None:
        """The first slot in ``first..last`` whose value relative to ``first`` is below
        ``floor``, or None: O(log size)."""
        work, low = self.work, self.low
        before_ns = 0
        for node in self.nodes(first, last):
            if low[node] - before_ns / _NS < floor:
                while node < self.size:  # descend: left child if it holds one, else right
                    left = 2 * node
                    if low[left] - before_ns / _NS < floor:
                        node = left
                    else:
                        before_ns += work[left]
                        node = left + 1
                return node - self.size
            before_ns += work[node]
        return None


@dataclass(slots=True, eq=False)
class _Entry:
    request_id: str
    bucket: int  # absolute deadline bucket
    work_ns: int  # predicted prefill when queued, integer nanoseconds
    in_ring: bool = False  # False while beyond the horizon (in the side heap)
    protected: bool = True
    live: bool = True  # False once removed (heap entries are deleted lazily)


class WaitingWork:
    """Index of waiting, still-feasible requests' predicted prefill by deadline."""

    def __init__(self, predictor: TTFTPredictor, headroom: float = 0.0) -> None:
        self._predictor = predictor
        # Admission's margin (``AdmissionConfig.headroom``): a request is indexed, ordered and
        # protected by ``deadline - headroom x target``, so that arrivals leave it that margin.
        self._headroom = headroom
        self._tree = _RingTree(BUCKETS)
        self._entries: dict[str, _Entry] = {}
        self._by_slot: dict[int, list[_Entry]] = {}  # ring entries per occupied slot
        self._by_latest_start: list[tuple[float, int, _Entry]] = []
        self._beyond_horizon: list[tuple[int, int, _Entry]] = []
        self._seq = 0
        self._now = 0.0
        self._window = 0  # first bucket of the ring window: the bucket of the latest `now`
        self.unprotected = 0  # requests the estimate gave up protecting
        # (window, last bucket, tree version) -> ring work ns of window..last: an arrival asks
        # work_before_s and then spare_work_s for the same deadline.
        self._prefix_key: tuple[int, int, int] | None = None
        self._prefix_ns = 0

    def __len__(self) -> int:
        """Requests indexed (waiting and not yet late)."""
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def request_ids(self) -> list[str]:
        """The requests indexed (a copy: callers may re-index them)."""
        return list(self._entries)

    # ------------------------------------------------------------------ updates

    def add(self, rec: RequestRecord, now: float) -> None:
        """Index a request that has just become WAITING (a late one is not indexed)."""
        self._advance(now)
        self.remove(rec.request_id)  # a re-queued request replaces its old entry
        predicted = self._predictor.predict(rec.remaining_tokens)
        remaining = predicted - rec.executed_s
        due = rec.deadline_s - self._headroom * rec.ttft_slo_s
        latest_start = due - (remaining if remaining > 0.0 else 0.0)
        if latest_start < self._now:
            return
        entry = _Entry(rec.request_id, math.floor(due / BUCKET_S), round(predicted * _NS))
        self._entries[rec.request_id] = entry
        self._seq += 1
        heapq.heappush(self._by_latest_start, (latest_start, self._seq, entry))
        if entry.bucket < self._window + BUCKETS:
            self._into_ring(entry)
        else:
            heapq.heappush(self._beyond_horizon, (entry.bucket, self._seq, entry))

    def remove(self, request_id: str) -> None:
        """Forget a request that left WAITING (started, cancelled); no-op if not indexed."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        entry.live = False
        if entry.in_ring:
            slot = entry.bucket % BUCKETS
            tree = self._tree
            tree.slot_ns[slot] -= entry.work_ns
            if entry.protected:
                tree.protected[slot] -= 1
            members = self._by_slot[slot]
            members.remove(entry)
            if not members:
                del self._by_slot[slot]
            tree.refresh(slot)

    # ------------------------------------------------------------------ queries

    def work_before_s(self, deadline_s: float, now: float) -> float:
        """Predicted prefill seconds of indexed requests that are feasible at ``now`` and
        due no later than ``deadline_s`` (to the bucket)."""
        self._advance(now)
        last = math.floor(deadline_s / BUCKET_S)
        if last < self._window:
            return 0.0
        if last - self._window >= BUCKETS:
            # Beyond the horizon: the whole ring plus the few far entries due by then.
            far = sum(e.work_ns for _, _, e in self._beyond_horizon if e.live and e.bucket <= last)
            return (self._tree.work[1] + far) / _NS
        return self._prefix(last) / _NS

    def _prefix(self, last: int) -> int:
        """Ring work ns of buckets ``window..last`` (``window <= last < window + BUCKETS``)."""
        key = (self._window, last, self._tree.version)
        if key != self._prefix_key:
            self._prefix_ns = self._ring_query(self._window, last)[0]
            self._prefix_key = key
        return self._prefix_ns

    def spare_work_s(self, deadline_s: float, now: float, workers: int, busy_s: float) -> float:
        """Seconds of work (on one worker) that can still run before a request due at
        ``deadline_s`` without pushing a protected request due in a later bucket past its
        bucket's start, when ``workers`` workers first have ``busy_s`` seconds of other work
        (running and paused units); ``inf`` if no such request is indexed.

        Requests whose own spare is already negative are unprotected first."""
        self._advance(now)
        tree = self._tree
        if workers != tree.workers:
            self._rebuild(workers)
        floor = now * workers + busy_s  # a protected bucket needs its value >= floor
        while (slot := self._first_below(floor)) is not None:
            self._unprotect(slot)
        first = max(math.floor(deadline_s / BUCKET_S) + 1, self._window)
        last = self._window + BUCKETS - 1
        if first > last:
            return _INF
        before_ns = self._prefix(first - 1) if first > self._window else 0
        low = self._ring_query(first, last)[1]
        # Far entries are not protected until they reach the ring (a minute away).
        return low - before_ns / _NS - floor

    # ------------------------------------------------------------------ internals

    def _ring_query(self, first: int, last: int) -> tuple[int, float]:
        """``(work ns, low)`` over absolute buckets ``first..last`` inside the window."""
        a, b = first % BUCKETS, last % BUCKETS
        if a <= b:
            return self._tree.query(a, b)
        head_ns, head_low = self._tree.query(a, BUCKETS - 1)
        tail_ns, tail_low = self._tree.query(0, b)
        return head_ns + tail_ns, min(head_low, tail_low - head_ns / _NS)

    def _first_below(self, floor: float) -> int | None:
        """The first slot, in window order, whose protected bucket's value (``start * workers
        - work due up to it``, from the window's start) is below ``floor``; None if none."""
        tree = self._tree
        start = self._window % BUCKETS
        # The ring's root starts at slot 0, not at the window: walk the window's two parts.
        slot = tree.first_below(start, BUCKETS - 1, floor)
        if slot is None and start > 0:
            head_ns = tree.query(start, BUCKETS - 1)[0]
            slot = tree.first_below(0, start - 1, floor + head_ns / _NS)
        return slot

    def _unprotect(self, slot: int) -> None:
        tree = self._tree
        for entry in self._by_slot[slot]:
            if entry.protected:
                entry.protected = False
                self.unprotected += 1
        tree.protected[slot] = 0
        tree.refresh(slot)

    def _rebuild(self, workers: int) -> None:
        self._tree.workers = workers
        for slot in self._by_slot:
            self._tree.refresh(slot)

    def _into_ring(self, entry: _Entry) -> None:
        entry.in_ring = True
        slot = entry.bucket % BUCKETS
        tree = self._tree
        tree.slot_ns[slot] += entry.work_ns
        tree.bucket[slot] = entry.bucket
        if entry.protected:
            tree.protected[slot] += 1
        self._by_slot.setdefault(slot, []).append(entry)
        tree.refresh(slot)

    def _advance(self, now: float) -> None:
        """Drop requests that turned late by ``now``; slide the ring window forward."""
        if now > self._now:
            self._now = now
            self._window = max(self._window, math.floor(now / BUCKET_S))
        now = self._now
        by_start = self._by_latest_start
        while by_start and by_start[0][0] < now:
            entry = heapq.heappop(by_start)[2]
            if entry.live:
                self.remove(entry.request_id)
        # Every ring entry is due in [now, now + horizon): its deadline is at least its latest
        # start, which is at least `now` after the loop above. Far entries come in as the
        # window reaches them.
        far = self._beyond_horizon
        horizon_end = self._window + BUCKETS
        while far and far[0][0] < horizon_end:
            entry = heapq.heappop(far)[2]
            if entry.live:
                self._into_ring(entry)
