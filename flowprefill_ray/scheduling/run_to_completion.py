"""The non-preemptive baselines, fcfs and edf: run every unit to completion.

An idle worker takes the queue head; heads are packed into one unit while the total stays
within ``max_batch_tokens`` and the worker's free KV bytes (a longer head runs alone, as
chunks of ``long_chunk_tokens`` back to back on its worker). Nothing is ever preempted, so no unit is ever paused. The two
differ only in the queue's order, so they share one module: ``FCFSPolicy`` (arrival order,
DistServe-style disaggregated prefill) and ``EDFPolicy`` (earliest deadline first).
"""

from __future__ import annotations

from abc import abstractmethod

from .config import PolicyConfig
from .events import Decision, WorkItem
from .policy import Policy
from .predictor import TTFTPredictor
from .queues import KeyedQueue
from .records import RequestRecord, WorkerState
from .slo import SLOConfig


class RunToCompletionPolicy(Policy):
    """Shared core of the two: subclasses give only the queue order (``_queue_key``)."""

    def __init__(
        self,
        config: PolicyConfig,
        predictor: TTFTPredictor,
        slo: SLOConfig | None = None,
    ) -> None:
        super().__init__(config, predictor, slo)
        self.queue = KeyedQueue(self._queue_key)

    @staticmethod
    @abstractmethod
    def _queue_key(rec: RequestRecord) -> float:
        """Smaller runs first."""

    def _enqueue(self, rec: RequestRecord, now: float) -> None:
        self.queue.push(rec)

    def _schedule(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        limit = self.config.max_batch_tokens
        for w in self.workers.values():
            if w.state is not WorkerState.IDLE:
                continue
            head = self.queue.pop()
            if head is None:
                break
            items = [WorkItem(head.request_id, 0, head.prompt_tokens)]
            room = self.memory.room(w, self.requests)
            room.take(items[0], force=True)  # nothing here to evict: it runs alone if need be
            total = head.prompt_tokens
            while (nxt := self.queue.peek()) is not None:
                new_total = total + nxt.prompt_tokens
                item = WorkItem(nxt.request_id, 0, nxt.prompt_tokens)
                if new_total > limit or not room.take(item):
                    break
                self.queue.pop()
                items.append(item)
                total = new_total
            out.append(self._start_unit(w, items, now, room))
        return out


class FCFSPolicy(RunToCompletionPolicy):
    """First come, first served, run to completion."""

    name = "fcfs"

    @staticmethod
    def _queue_key(rec: RequestRecord) -> float:
        # Arrival time, so a request re-queued after a worker loss keeps its place.
        return rec.arrival_s


class EDFPolicy(RunToCompletionPolicy):
    """Earliest deadline first, run to completion: deadline-aware ordering without preemption."""

    name = "edf"

    @staticmethod
    def _queue_key(rec: RequestRecord) -> float:
        return rec.deadline_s
