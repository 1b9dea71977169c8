"""Bringing a restarted prefill worker back into the scheduler's pool.

A prefill worker actor is created with ``max_restarts`` (``FaultToleranceConfig``). When its
process dies, the scheduler hears it from a failed call, tells the policy ``WorkerLeft`` (which
re-queues the worker's running and paused requests with their deadlines unchanged) and then
waits here until Ray has restarted the actor and the new process has loaded its model. Calls to
an actor that is restarting are held by Ray until it is alive again, so one ``info`` call is the
probe: it answers once the replacement is ready, or fails for good when restarts are exhausted.
"""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import RayActorError

logger = logging.getLogger(__name__)


async def wait_until_restarted(worker_id: str, handle, timeout_s: float) -> dict | None:
    """The restarted worker's ``info()`` once it answers, or None if it is gone for good
    (restarts exhausted, killed with ``no_restart``) or did not come back within
    ``timeout_s`` seconds."""
    try:
        return await asyncio.wait_for(handle.info.remote(), timeout=timeout_s)
    except RayActorError as error:
        logger.error("prefill worker %s will not come back: %s", worker_id, error)
    except TimeoutError:
        logger.error("prefill worker %s did not restart within %.0f s", worker_id, timeout_s)
    return None
