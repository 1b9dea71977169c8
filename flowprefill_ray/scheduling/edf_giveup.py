"""Chunked EDF that gives up on hopeless requests: the strongest non-preemptive baseline.

A chunked policy (``chunked.py``: units of at most ``chunk_size`` tokens, a decision at every
chunk boundary, no preemption) whose order is FlowPrefill's ranking (``priority.py``): a
request that can still make its deadline if it ran alone from now (slack
``deadline - now - predict(remaining tokens)`` >= 0) goes earliest deadline first; one that
cannot is demoted behind every feasible one (latest deadline first among them) and is served
only when nothing feasible waits on that worker. Plain chunked EDF keeps serving a hopeless
request first because its deadline is earliest, and makes the requests behind it late too.

Waiting requests live in FlowPrefill's ``SlackQueue`` (feasible by deadline, late ones apart);
a request between chunks is re-scored at each boundary. The slack prices the remaining tokens
as one whole prefill, so it ignores what chunking adds (overhead, re-read weights): a request
within that margin of its deadline counts as feasible and is still tried.
"""

from __future__ import annotations

from .chunked import ChunkedPolicy
from .priority import rank_key, slack_s
from .queues import SlackQueue
from .records import RequestRecord
from .request import RequestStatus


class EDFGiveUpPolicy(ChunkedPolicy):
    name = "edf_giveup"

    def _make_queue(self) -> SlackQueue:
        return SlackQueue(self.predictor, self.config.chunk_size, self.config.rescore_threshold)

    def _enqueue(self, rec: RequestRecord, now: float) -> None:
        self.queue.push(rec, now)

    def _peek_waiting(self, now: float) -> RequestRecord | None:
        top = self.queue.peek(now)  # also marks it late if it has just turned so
        return None if top is None else top[0]

    def _pop_waiting(self, now: float) -> None:
        self.queue.pop(now)

    def _rank(self, rec: RequestRecord, now: float) -> tuple[tuple[int, float], tuple[int, int]]:
        if rec.status is RequestStatus.WAITING:
            # The queue's own verdict, so that the merge with partials follows its order.
            slack = -1.0 if rec.queue_late else 0.0
        else:
            slack = slack_s(rec.deadline_s, now, self.predictor.predict(rec.remaining_tokens))
        return rank_key(slack, rec.deadline_s), rec.tiebreak
