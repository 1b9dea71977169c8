"""The engine as one shared service of the Serve application: ``EngineService``.

One replica. Its constructor starts the engine (``FlowPrefillEngine.start``: placement, the
prefill and decode workers, the named scheduler), so this replica owns those actors and Ray
ends them with it. The ingress replicas (app.py), any number of them, each attach a thin
client to it (``attachment``) and hold a lease on it (client_leases.py).

Serve health-checks it: a scheduler that is gone, or a worker that Ray will not restart any
more, fails the check, and Serve replaces the replica - a fresh engine. The ingress replicas
then find their scheduler gone, fail their own checks and attach to the new one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from .config import ServeAppArgs
from .engine_probe import RestartGrace, dead_workers, holder_alive, scheduler_state

logger = logging.getLogger(__name__)


@serve.deployment(
    name="EngineService",
    num_replicas=1,  # one scheduler per application: its decisions are global
    max_ongoing_requests=1024,  # lease renewals of every ingress replica, attachments
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=10,
)
class EngineService:
    """Starts and owns the engine; hands out attachments; releases dead clients' requests."""

    async def __init__(self, args: dict[str, Any]) -> None:
        # Imported here: the driver that calls build_app needs neither torch nor the engine.
        from flowprefill_ray.runtime.engine import FlowPrefillEngine

        from .client_leases import ClientLeases

        parsed = ServeAppArgs.model_validate(args)
        self._engine = await FlowPrefillEngine.start(parsed.runtime)
        self._attachment = self._engine.attachment()
        self._leases = ClientLeases(parsed.ingress.lease_s)
        self._grace = RestartGrace()
        self._reaper = asyncio.get_running_loop().create_task(self._release_expired_forever())
        logger.info(
            "FlowPrefill engine service ready: %d prefill and %d decode workers",
            len(self._attachment.prefill),
            len(self._attachment.decode),
        )

    def attachment(self):
        """What ``FlowPrefillEngine.attach`` takes (config and actor handles)."""
        return self._attachment

    def register_client(self, name: str, holder=None) -> str:
        """A lease for the ingress replica ``name``; ``holder`` is its actor handle."""
        return self._leases.register(name, holder)

    def renew_lease(self, client_id: str, in_flight: int) -> bool:
        return self._leases.renew(client_id, in_flight)

    def end_lease(self, client_id: str) -> None:
        self._leases.end(client_id)

    def lease_stats(self) -> dict:
        """The live leases and how many clients expired and requests were released."""
        return self._leases.export()

    async def _release_expired_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._leases.lease_s / 4))
            lapsed = self._leases.lapsed()
            if lapsed:
                await asyncio.gather(*(self._release_lapsed(c, h) for c, h in lapsed.items()))

    async def _release_lapsed(self, client_id: str, holder) -> None:
        """Release a lapsed client's requests once Ray confirms its holder gone; a holder that
        answers was only late (a starved replica) and keeps its lease and its streams."""
        if await holder_alive(holder):
            self._leases.extend(client_id)
            logger.warning(
                "ingress client %s missed its lease renewals but answers: its lease is extended",
                client_id,
            )
            return
        if not self._leases.expire(client_id):
            return  # it renewed while being probed
        released = await self._release(client_id)
        self._leases.count_released(released)
        logger.warning(
            "ingress client %s stopped renewing its lease and is gone: released its %d request(s)",
            client_id,
            released,
        )

    async def _release(self, client_id: str) -> int:
        """Cancel every request of ``client_id`` wherever it is: in prefill (the scheduler),
        decoding, or on its way to a decode worker (which drops the late hand-off)."""
        handles = [self._attachment.scheduler, *self._attachment.decode.values()]
        results = await asyncio.gather(
            *(h.cancel_client.remote(client_id) for h in handles), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.warning("%d cancel call(s) failed: %s", len(failed), failed[0])
        return sum(r for r in results if not isinstance(r, BaseException))

    async def check_health(self) -> None:
        """Serve's health check: the scheduler answers (or is being restarted, for a grace
        period) and no worker is dead for good."""
        self._grace.check(await scheduler_state(self._engine))
        dead = await dead_workers({**self._attachment.prefill, **self._attachment.decode})
        if dead:
            raise RuntimeError(f"FlowPrefill workers {dead} are dead and will not restart")

    async def __del__(self) -> None:
        reaper = getattr(self, "_reaper", None)
        if reaper is not None:
            reaper.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.shutdown()
