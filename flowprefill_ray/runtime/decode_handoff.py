"""Handing a finished prefill to a decode worker: which worker, and how its KV gets there.

The scheduler picks the least-loaded decode worker from its own view of each one: the load the
worker last reported (with every accept reply, and again whenever a request finishes there)
plus the hand-offs still in flight to it. It forwards the ObjectRef of the KV, never the KV:
the decode worker fetches the bytes from the prefill worker itself, through the object store
or over a collective group (Ray Direct Transport).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .messages import AcceptAck, FirstToken, Handoff
from .scheduler_stats import SAMPLES

if TYPE_CHECKING:
    from .scheduler import TrackedRequest

logger = logging.getLogger(__name__)


@dataclass
class DecodeLoad:
    """The scheduler's view of one decode worker: last reported load plus hand-offs in flight."""

    handle: object
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0

    def score(self, max_batch: int) -> float:
        # KV memory and queue length both limit how soon a new request gets decode steps.
        return self.kv_usage + (self.running + self.waiting + self.in_flight) / max_batch


class DecodeHandoff:
    """Owned by the scheduler: its decode workers' loads and the hand-offs to them.

    ``kv_transport``: None for the object store, else the tensor transport ("gloo", "nccl").
    ``spawn`` runs a coroutine as a task of the scheduler (it awaits the decode worker's reply).
    """

    def __init__(
        self,
        decode_workers: dict[str, object],
        max_batch: int,
        kv_transport: str | None,
        spawn: Callable[[Coroutine], None],
    ):
        self.loads = {wid: DecodeLoad(handle) for wid, handle in decode_workers.items()}
        # (kv_bytes, transfer_s) of each hand-off, as the decode worker measured it.
        self.transfers: deque[tuple[int, float]] = deque(maxlen=SAMPLES)
        self._max_batch = max_batch
        self._kv_transport = kv_transport
        self._spawn = spawn

    @property
    def handles(self) -> list[object]:
        return [load.handle for load in self.loads.values()]

    def update_load(self, decode_id: str, running: int, waiting: int, kv_usage: float) -> None:
        """A decode worker's load changed (a request finished or was freed)."""
        load = self.loads.get(decode_id)
        if load is not None:
            load.running, load.waiting, load.kv_usage = running, waiting, kv_usage

    def pick(self) -> str:
        max_batch = self._max_batch
        return min(self.loads, key=lambda wid: self.loads[wid].score(max_batch))

    def send(
        self, prefill_worker, decode_id: str, tracked: TrackedRequest, first: FirstToken
    ) -> None:
        """Tell decode worker ``decode_id`` to take over ``tracked``, whose KV (with its first
        token ``first``) waits on ``prefill_worker``. Returns once the calls are issued."""
        handoff = Handoff(
            tracked.request.request_id,
            first.token_id,
            tracked.request.prompt_tokens,
            tracked.asked.sampling,
            tracked.request.slo_class,
            first.generator_state,
            time.time(),
            tracked.asked.client_id,
        )
        take = prefill_worker.take_kv
        load = self.loads[decode_id]
        if self._kv_transport is None:
            # The ref travels nested in a list: the decode worker fetches (and times) the bytes
            # itself from the object store; this actor never touches them.
            call = load.handle.accept.remote(handoff, [take.remote(handoff.request_id)])
        else:
            # Ray Direct Transport: the tensors go prefill worker -> decode worker over the
            # collective group when the decode worker's call needs them.
            kv_ref = take.options(tensor_transport=self._kv_transport).remote(handoff.request_id)
            call = load.handle.accept_direct.remote(handoff, kv_ref)
        load.in_flight += 1
        self._spawn(self._await_accept(decode_id, call))

    async def _await_accept(self, decode_id: str, call) -> None:
        load = self.loads.get(decode_id)
        try:
            ack: AcceptAck = await call
        except Exception:
            # The client's stream from that decode worker fails too and reports the error.
            logger.exception("hand-off to decode worker %s failed", decode_id)
            return
        finally:
            if load is not None:
                load.in_flight -= 1
        load.running, load.waiting, load.kv_usage = ack.running, ack.waiting, ack.kv_usage
        self.transfers.append((ack.kv_bytes, ack.transfer_s))

    def export(self) -> dict:
        """Each decode worker's load, under ``Scheduler.stats``'s "decode_load"."""
        return {
            wid: {
                "running": d.running,
                "waiting": d.waiting,
                "kv_usage": d.kv_usage,
                "in_flight": d.in_flight,
            }
            for wid, d in self.loads.items()
        }
