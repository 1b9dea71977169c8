"""Leases of the ingress replicas on the engine: how the engine learns that a replica died.

Ray does not cancel an actor call when its caller dies (checked on Ray 2.60: an async actor
call and a streaming generator from a killed caller both ran to their end). A killed ingress
replica would so leave its requests running for nobody: the scheduler prefills them, the decode
workers generate every token, and the request deadline, kept by the client, is gone with it.

So each ingress replica holds a lease on the ``EngineService``: it registers, stamps the
lease's id on every request it submits (``EngineRequest.client_id``), and renews the lease
every ``renew_interval_s`` (``LeaseKeeper``). A lease not renewed for ``lease_s`` has expired:
the service cancels every request of that client wherever it is, on the scheduler (still in
prefill) and on every decode worker (decoding, or a hand-off still on its way, which the
worker drops when it lands). The requests carry the id, so none escapes: not even one
submitted just before the replica died, after its last renewal. ``ClientLeases`` is the
service's record of the leases.

A lapsed lease is a suspicion, not a verdict: a live replica starved of CPU for a moment (a
replacement replica importing torch beside it, a long GC pause) can miss its renewals, and
cancelling its streams then would hurt requests that are being read. So each lease names its
holder, the replica's actor handle, and the service asks Ray about the holder before it
releases anything (``EngineService._release_lapsed``): an actor that is dead, or that does not
answer within a probe, is gone; one that answers keeps its lease for another ``lease_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Lease:
    renewed_s: float
    holder: Any = None  # the client's actor handle, asked before a lapse is taken for death
    in_flight: int = 0  # as last reported, for stats


class ClientLeases:
    """The engine owner's record of its clients' leases (plain Python; one event loop)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self.expired_clients = 0
        self.released_requests = 0
        self.lapsed_alive = 0  # lapses whose holder still answered: kept, not released

    def register(self, name: str, holder: Any = None) -> str:
        """A new client's id (``name`` makes it readable in logs: the replica's id).
        ``holder``: its actor handle; without one a lapse is taken for death at once."""
        client_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self._leases[client_id] = _Lease(self._clock(), holder)
        return client_id

    def renew(self, client_id: str, in_flight: int) -> bool:
        """Renew ``client_id``'s lease (``in_flight``: its requests now, for stats). False
        when the lease had already expired (its requests were cancelled): the client
        registers again."""
        lease = self._leases.get(client_id)
        if lease is None:
            return False
        lease.renewed_s = self._clock()
        lease.in_flight = in_flight
        return True

    def end(self, client_id: str) -> None:
        """A client that shuts down cleanly ends its own requests; nothing to release."""
        self._leases.pop(client_id, None)

    def lapsed(self) -> dict[str, Any]:
        """The leases not renewed for ``lease_s``: client id -> holder (None if unknown). The
        caller asks after each holder, then calls ``expire`` or ``extend``."""
        deadline = self._clock() - self.lease_s
        return {
            cid: lease.holder for cid, lease in self._leases.items() if lease.renewed_s < deadline
        }

    def expire(self, client_id: str) -> bool:
        """Take ``client_id`` for dead: its lease is removed (a late renewal is refused and the
        client registers again), and the caller cancels its requests. False if it had gone
        already (renewed, ended or expired meanwhile)."""
        lease = self._leases.get(client_id)
        if lease is None or lease.renewed_s >= self._clock() - self.lease_s:
            return False
        del self._leases[client_id]
        self.expired_clients += 1
        return True

    def extend(self, client_id: str) -> None:
        """``client_id``'s holder answered although its lease lapsed: it is alive, only late.
        Its lease runs for another ``lease_s`` instead of its requests being cancelled."""
        lease = self._leases.get(client_id)
        if lease is not None:
            lease.renewed_s = self._clock()
            self.lapsed_alive += 1

    def count_released(self, requests: int) -> None:
        """How many requests cancelling an expired client's found (stats)."""
        self.released_requests += requests

    def export(self) -> dict:
        now = self._clock()
        return {
            "clients": {
                cid: {"in_flight": lease.in_flight, "renewed_s_ago": now - lease.renewed_s}
                for cid, lease in self._leases.items()
            },
            "expired_clients": self.expired_clients,
            "released_requests": self.released_requests,
            "lapsed_alive": self.lapsed_alive,
        }


class LeaseKeeper:
    """An ingress replica's side: registers with the service, hands the lease's id to the
    engine client (which stamps it on each request) and renews the lease until stopped.
    ``service`` is the ``EngineService`` deployment handle; ``engine`` an attached
    ``FlowPrefillEngine``."""

    def __init__(self, service, engine, name: str, renew_interval_s: float):
        self._service = service
        self._engine = engine
        self._name = name
        self._interval_s = renew_interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                renewed = await self._service.renew_lease.remote(
                    self.client_id, len(self._engine.in_flight)
                )
                if not renewed:
                    # Expired while this replica was alive (stalled, or the service restarted):
                    # its requests were cancelled; later ones need a new lease.
                    logger.warning("lease %s had expired; registering again", self.client_id)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the service may be restarting; try again later
                logger.warning("lease renewal failed", exc_info=True)

    @property
    def client_id(self) -> str | None:
        """The lease held now: kept on the engine client, which stamps it on each request."""
        return self._engine.client_id

    async def _register(self) -> None:
        self._engine.client_id = await self._service.register_client.remote(
            self._name, _current_actor()
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        # With requests still in flight the lease is left to expire, so that they are released.
        if self.client_id is not None and not self._engine.in_flight:
            try:
                # Bounded: the service may be going away at the same time (app deletion).
                await asyncio.wait_for(self._service.end_lease.remote(self.client_id), 2.0)
            except Exception:  # noqa: BLE001 - the service is gone too; nothing to end
                logger.debug("ending lease %s failed", self.client_id, exc_info=True)


def _current_actor() -> Any:
    """This process's actor handle (an ingress replica is one), or None outside an actor."""
    import ray

    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:  # not in an actor (a driver attaching by hand)
        return None
