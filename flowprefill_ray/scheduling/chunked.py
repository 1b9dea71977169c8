"""Chunked prefill (vLLM / Sarathi-Serve style): fixed token-budget units, no preemption.

Each unit carries at most ``chunk_size`` prompt tokens. At every chunk boundary the idle
worker packs pieces of requests in ``chunk_order`` (arrival order for ``fcfs``, deadline for
``edf``): the requests whose earlier chunks it already holds (their KV lives there, so they can
only continue there) compete with new requests from the global queue. A request's piece is
its next ``min(remaining, budget left)`` tokens, so one unit may hold the tail of one request
and the heads of others. Switching to urgent work can happen only at a chunk boundary.

A piece joins only within the worker's free KV bytes (``kv_memory.py``). Requests between
chunks cannot be evicted (no decision drops their KV), so when they fill the budget the best
of them goes on alone, beyond it if need be: finishing it is the only way to free memory.

Other chunked baselines differ only in the order, so they subclass this one and override
``_order_value`` (a static key, computed once when a request is queued: ``srpf.py``,
``priority_chunked.py``) or, for an order that moves with ``now``, ``_rank`` and the waiting
queue's hooks (``edf_giveup.py``).
"""

from __future__ import annotations

from typing import Any

from .config import PolicyConfig
from .events import Decision, WorkItem
from .kv_memory import UnitRoom
from .policy import Policy
from .predictor import TTFTPredictor
from .queues import KeyedQueue
from .records import RequestRecord, WorkerRecord, WorkerState
from .request import RequestStatus
from .slo import SLOConfig


class ChunkedPolicy(Policy):
    name = "chunked"

    def __init__(
        self,
        config: PolicyConfig,
        predictor: TTFTPredictor,
        slo: SLOConfig | None = None,
    ) -> None:
        super().__init__(config, predictor, slo)
        self._by_deadline = config.chunk_order == "edf"
        self.queue = self._make_queue()

    def _make_queue(self) -> Any:
        """The waiting queue; the hooks below are all that read it."""
        return KeyedQueue(self._order_value)

    def _order_value(self, rec: RequestRecord) -> Any:
        """Smaller goes first; must not change while ``rec`` waits (the queue keys it once)."""
        return rec.deadline_s if self._by_deadline else rec.arrival_s

    def _rank(self, rec: RequestRecord, now: float) -> tuple[Any, tuple[int, int]]:
        """Where ``rec`` (waiting, or between chunks) stands at ``now``; smaller first."""
        return self._order_value(rec), rec.tiebreak

    def _peek_waiting(self, now: float) -> RequestRecord | None:
        return self.queue.peek()

    def _pop_waiting(self, now: float) -> None:
        self.queue.pop()

    def _enqueue(self, rec: RequestRecord, now: float) -> None:
        self.queue.push(rec)

    def _schedule(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        for w in self.workers.values():
            if w.state is WorkerState.IDLE:
                items, room = self._next_chunk(w, now)
                if items:
                    out.append(self._start_unit(w, items, now, room))
        return out

    def _next_chunk(self, w: WorkerRecord, now: float) -> tuple[list[WorkItem], UnitRoom]:
        """Pieces for ``w``'s next unit, best first, within the ``chunk_size`` budget and
        the worker's free KV bytes, and the room they took of those."""
        partials = sorted(
            (
                rec
                for rec in (self.requests[rid] for rid in w.partial)
                if rec.status is RequestStatus.PAUSED
            ),
            key=lambda rec: self._rank(rec, now),
        )
        budget = self.config.chunk_size
        items: list[WorkItem] = []
        room = self.memory.room(w, self.requests)
        i = 0
        while budget > 0:
            partial = partials[i] if i < len(partials) else None
            new = self._peek_waiting(now)
            if partial is None and new is None:
                break
            take_partial = new is None or (
                partial is not None and self._rank(partial, now) <= self._rank(new, now)
            )
            rec = partial if take_partial else new
            assert rec is not None
            piece = min(rec.prompt_tokens - rec.prefilled_tokens, budget)
            item = WorkItem(rec.request_id, rec.prefilled_tokens, rec.prefilled_tokens + piece)
            if not room.take(item):
                if not items and partials:
                    # The worker's KV is full of unfinished requests: only finishing them
                    # frees it, so the best one goes on (beyond the budget if need be).
                    best = partials[0]
                    piece = min(best.remaining_tokens, self.config.chunk_size)
                    item = WorkItem(
                        best.request_id, best.prefilled_tokens, best.prefilled_tokens + piece
                    )
                    room.take(item, force=True)
                    items.append(item)
                elif not items:  # nothing held here, and still no room: it runs alone
                    room.take(item, force=True)
                    self._pop_waiting(now)
                    items.append(item)
                break
            if take_partial:
                i += 1
            else:
                self._pop_waiting(now)
            items.append(item)
            budget -= piece
        return items, room
