"""Chunked prefill (vLLM / Sarathi-Serve style): fixed token-budget units, no preemption.

Each unit carries at most ``chunk_size`` prompt tokens. At every chunk boundary the idle
worker packs pieces of requests in ``chunk_order`` (arrival order for ``fcfs``, deadline for
``edf``): the requests whose earlier chunks it already holds (their KV lives there, so they can
only continue there) compete with new requests from the global queue. A request's piece is
its next ``min(remaining, budget left)`` tokens, so one unit may hold the tail of one request
and the heads of others. Switching to urgent work can happen only at a chunk boundary.
"""

from __future__ import annotations

from .config import PolicyConfig
from .events import Decision, WorkItem
from .policy import KVCheck, Policy
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
        kv_check: KVCheck | None = None,
        slo: SLOConfig | None = None,
    ) -> None:
        super().__init__(config, predictor, kv_check, slo)
        self._by_deadline = config.chunk_order == "edf"
        self.queue = KeyedQueue(self._order_value)

    def _order_value(self, rec: RequestRecord) -> float:
        return rec.deadline_s if self._by_deadline else rec.arrival_s

    def _enqueue(self, rec: RequestRecord, now: float) -> None:
        self.queue.push(rec)

    def _schedule(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        for w in self.workers.values():
            if w.state is WorkerState.IDLE:
                items = self._next_chunk(w)
                if items:
                    out.append(self._start_unit(w, items, now))
        return out

    def _next_chunk(self, w: WorkerRecord) -> list[WorkItem]:
        """Pieces for ``w``'s next unit, best first, within the ``chunk_size`` budget."""
        partials = sorted(
            (
                rec
                for rec in (self.requests[rid] for rid in w.partial)
                if rec.status is RequestStatus.PAUSED
            ),
            key=lambda rec: (self._order_value(rec), rec.tiebreak),
        )
        budget = self.config.chunk_size
        items: list[WorkItem] = []
        total = 0
        i = 0
        while budget > 0:
            partial = partials[i] if i < len(partials) else None
            new = self.queue.peek()
            if partial is None and new is None:
                break
            take_partial = new is None or (
                partial is not None
                and (self._order_value(partial), partial.tiebreak)
                <= (self._order_value(new), new.tiebreak)
            )
            rec = partial if take_partial else new
            assert rec is not None
            piece = min(rec.prompt_tokens - rec.prefilled_tokens, budget)
            if not self._kv_admits(w.worker_id, total + piece):
                break
            if take_partial:
                i += 1
            else:
                self.queue.pop()
            items.append(
                WorkItem(rec.request_id, rec.prefilled_tokens, rec.prefilled_tokens + piece)
            )
            budget -= piece
            total += piece
        return items
