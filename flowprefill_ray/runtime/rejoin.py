"""Bringing a restarted prefill worker back into the scheduler's pool.

A prefill worker actor is created with ``max_restarts`` (``FaultToleranceConfig``). When its
process dies, the scheduler hears it from a failed call, tells the policy ``WorkerLeft`` (which
re-queues the worker's running and paused requests with their deadlines unchanged) and then
waits here until Ray has restarted the actor and the new process has loaded its model. Calls to
an actor that is restarting fail at once ("the actor is restarting"), so ``info`` is probed
until the replacement answers, or fails for good (``ActorDiedError``: restarts exhausted).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import ActorDiedError, RayActorError

logger = logging.getLogger(__name__)


async def wait_until_restarted(
    worker_id: str, handle, timeout_s: float, poll_s: float = 0.5
) -> dict | None:
    """The restarted worker's ``info()`` once it answers, or None if it is gone for good
    (restarts exhausted, killed with ``no_restart``) or did not come back within
    ``timeout_s`` seconds. ``poll_s``: pause between probes while Ray reports it restarting."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            return await asyncio.wait_for(handle.info.remote(), timeout=left)
        except ActorDiedError as error:
            logger.error("prefill worker %s will not come back: %s", worker_id, error)
            return None
        except RayActorError:
            # "The actor is restarting": Ray fails calls made in that window; ask again.
            await asyncio.sleep(poll_s)
        except TimeoutError:
            break
    logger.error("prefill worker %s did not restart within %.0f s", worker_id, timeout_s)
    return None
