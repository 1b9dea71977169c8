"""What the scheduler does when prefill work fails: a worker dies, a unit breaks, a request fails.

A dead prefill worker's units are dropped and the policy re-queues their requests
(``WorkerLeft``); Ray restarts the worker (``max_restarts``) and it rejoins once its new process
answers (rejoin.py). While no worker is left and none is coming back, the requests in prefill
fail rather than wait forever. A unit that breaks as a whole fails its requests; a request
whose own prefill failed fails alone. Clients see a generic message; the cause is in the log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from flowprefill_ray.errors import EngineUnavailableError, RequestFailedError
from flowprefill_ray.scheduling.events import Cancelled, UnitCompleted, WorkerLeft

from .rejoin import wait_until_restarted

if TYPE_CHECKING:
    from .scheduler import Scheduler

logger = logging.getLogger(__name__)

# What a call to a prefill worker raises when its process is gone (dead or restarting).
WORKER_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


class FailureHandling:
    """Part of the ``Scheduler`` it is given: ends failed work and re-queues or fails what
    depended on it, reading and changing that scheduler's requests, units and prefill workers
    directly (one actor, one event loop, so no locks)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def worker_failed(self, worker_id: str) -> None:
        s = self._scheduler
        if worker_id not in s._prefill:
            return
        logger.error("prefill worker %s is gone; its work is re-queued", worker_id)
        handle = s._prefill.pop(worker_id)
        s._counts["workers_lost"] += 1
        s._handle(WorkerLeft(worker_id))  # the policy drops its units, re-queues their requests
        if s.config.faults.worker_max_restarts != 0 and not s._closed:
            s._rejoining.add(worker_id)
            s._spawn(self._rejoin(worker_id, handle))
        self.fail_all_if_no_worker()

    async def _rejoin(self, worker_id: str, handle) -> None:
        """Wait for Ray to restart a dead prefill worker, then give it work again."""
        s = self._scheduler
        info = await wait_until_restarted(worker_id, handle, s.config.faults.rejoin_timeout_s)
        s._rejoining.discard(worker_id)
        if info is not None and not s._closed and worker_id not in s._prefill:
            logger.warning(
                "prefill worker %s restarted (pid %s) and rejoins", worker_id, info["pid"]
            )
            try:
                await s.add_prefill_worker(worker_id, handle)
                s._counts["workers_rejoined"] += 1
            except WORKER_GONE:
                logger.error("prefill worker %s died again before it could rejoin", worker_id)
        self.fail_all_if_no_worker()

    def fail_all_if_no_worker(self) -> None:
        # Requests wait for a restarting worker (bounded by rejoin_timeout_s), never forever.
        s = self._scheduler
        if not s._prefill and not s._rejoining:
            for tracked in list(s._requests.values()):
                if not tracked.done.done():
                    tracked.done.set_exception(
                        EngineUnavailableError("every prefill worker is gone")
                    )
            s._requests.clear()

    def unit_failed(self, worker_id: str, unit_id: int, error: Exception) -> None:
        # The worker isolates per-request failures itself (``UnitOutcome.failed``); reaching
        # here means the unit as a whole broke, and the worker has already released it.
        s = self._scheduler
        unit = s.unit(unit_id)  # the policy forgets it on the UnitCompleted below
        for rid in unit.request_ids if unit else ():
            self.fail_request(rid)
        # The worker is idle again; the policy frees it on the unit's completion.
        s._handle(UnitCompleted(worker_id, unit_id, 0.0))

    def fail_request(self, request_id: str) -> None:
        """End one request with an error. The client sees a generic message and its request
        id; the cause is in this actor's log (it may hold internals: paths, tracebacks)."""
        s = self._scheduler
        tracked = s._requests.pop(request_id, None)
        if tracked is None:
            return
        # Counted in stats here; the metric (finish_reason="error") is counted where the
        # client's stream ends, in the engine (request_stream.py), so decode failures count too.
        s._counts["failed"] += 1
        if not tracked.done.done():
            tracked.done.set_exception(
                RequestFailedError(f"the prefill of request {request_id} failed")
            )
        s.timeline.note_failed(request_id, s.now())
        s._handle(Cancelled(request_id))
