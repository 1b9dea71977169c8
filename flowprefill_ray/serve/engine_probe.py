"""Is the engine there? The probes behind the Serve health checks and ``/health``.

A scheduler or worker that Ray is restarting is not dead: failing a health check for it would
make Serve replace the replica, and with the engine service that is the whole engine - the
workers and every stream they serve. ``RestartGrace`` tolerates a restart for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import ActorDiedError, ActorUnavailableError

from flowprefill_ray.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

# How long a health check tolerates a scheduler that Ray is restarting (seconds): a restart
# takes a few seconds; one that takes longer than this is treated as a dead engine.
SCHEDULER_RESTART_GRACE_S = 60.0
PROBE_TIMEOUT_S = 5.0


async def scheduler_state(engine) -> str:
    """ "ok" when the engine's scheduler answers stats() within a few seconds, "restarting"
    while Ray restarts it, "down" otherwise."""
    try:
        await asyncio.wait_for(engine.stats(), timeout=PROBE_TIMEOUT_S)
    except EngineUnavailableError as error:
        if isinstance(error.__cause__, ActorUnavailableError):
            logger.warning("engine scheduler is restarting: %s", error)
            return "restarting"
        logger.warning("engine health check failed", exc_info=True)
        return "down"
    except Exception:  # noqa: BLE001 - any other failure to answer means unhealthy
        logger.warning("engine health check failed", exc_info=True)
        return "down"
    return "ok"


async def dead_workers(workers: dict[str, object]) -> list[str]:
    """Ids of the workers that are dead for good (Ray will not restart them). A worker that is
    busy, slow or restarting is not dead: the scheduler waits for it to rejoin."""

    async def probe(handle) -> bool:
        try:
            await asyncio.wait_for(handle.info.remote(), timeout=PROBE_TIMEOUT_S)
        except ActorDiedError:
            return True
        except Exception:  # noqa: BLE001 - unavailable, restarting or slow: not dead
            return False
        return False

    answers = await asyncio.gather(*(probe(h) for h in workers.values()))
    return [wid for wid, dead in zip(workers, answers, strict=True) if dead]


async def holder_alive(handle) -> bool:
    """Whether a lease holder (an ingress replica's actor) still answers Ray within the probe
    timeout. ``__ray_ready__`` runs on the actor's own loop, not on the replica's user-code
    loop, so a replica busy serving still answers; a killed one raises at once."""
    if handle is None:
        return False
    try:
        await asyncio.wait_for(handle.__ray_ready__.remote(), timeout=PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - dead, gone with its node, or mute for the whole probe
        return False
    return True


class RestartGrace:
    """Turns probe states into a health verdict: "down" fails at once, "restarting" only
    after ``grace_s`` of restarting without a break."""

    def __init__(self, grace_s: float = SCHEDULER_RESTART_GRACE_S):
        self.grace_s = grace_s
        self._restarting_since: float | None = None

    def check(self, state: str) -> None:
        """Raise ``RuntimeError`` naming ``state`` unless the engine counts as healthy."""
        if state == "ok":
            self._restarting_since = None
            return
        if state == "restarting":
            now = time.monotonic()
            self._restarting_since = self._restarting_since or now
            if now - self._restarting_since < self.grace_s:
                return
        raise RuntimeError(f"FlowPrefill engine is unavailable ({state})")
