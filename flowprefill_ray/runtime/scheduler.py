"""The global scheduler actor: the only place prefill decisions are made.

One named async actor. It runs the scheduling policy object unchanged (the same class the
simulator drives) and calls it only on events: a request arrives, a unit completes or pauses,
a worker joins or fails, a request is cancelled. It stamps arrivals on its own monotonic clock,
turns each decision into calls on the prefill workers, and, when a prefill completes, hands the
request to the least-loaded decode worker: it forwards the ObjectRef of the KV, never the KV.

Its own cost is measured per event: the time inside ``policy.on_event`` plus dispatching the
decisions (issuing the remote calls, not waiting for them).

This file is the actor: its calls, its state and the event loop. Its parts, each a plain
object the actor creates and owns, live beside it:

- unit_calls.py: the calls that carry units through the prefill workers, and their answers;
- decode_handoff.py: the decode workers' loads and the hand-off of a finished prefill;
- prefill_failures.py: a prefill worker dies, a unit breaks, a request fails;
- scheduler_stats.py: the samples behind ``stats()`` and the queue gauges.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import ray

from flowprefill_ray.engine_request import EngineRequest
from flowprefill_ray.errors import (
    DuplicateRequestError,
    EngineUnavailableError,
    RequestRejectedError,
)
from flowprefill_ray.scheduling import Request, TTFTPredictor, make_policy
from flowprefill_ray.scheduling.events import (
    Arrival,
    Cancelled,
    Decision,
    Discard,
    Downgrade,
    Event,
    Overtaken,
    Preempt,
    Reject,
    Resume,
    RunUnit,
    WorkerJoined,
    WorkUnit,
)
from flowprefill_ray.scheduling.prefix_blocks import prefix_hashes
from flowprefill_ray.scheduling.timeline import Timeline

from .config import RuntimeConfig
from .decode_handoff import DecodeHandoff
from .id_memory import remember
from .messages import PrefillDone
from .metrics import RuntimeMetrics
from .prefill_failures import FailureHandling
from .scheduler_stats import QueueGauges, SchedulerSamples
from .unit_calls import UnitCalls

logger = logging.getLogger(__name__)

# Ingress clients whose lease expired, remembered so that a stalled one's late requests are
# refused (a client takes a new lease, so one id never returns).
_GONE_CLIENTS_MEMORY = 1024


@dataclass
class TrackedRequest:
    """A request from arrival until its first token (then the decode worker owns it).

    ``asked``: the request as the engine validated and sent it (unchanged; the work items and
    the hand-off are derived from it); ``request``: the policy's view of it (its class and
    target change if admission control downgrades it)."""

    asked: EngineRequest
    request: Request
    done: asyncio.Future
    first_run_s: float | None = None
    first_unit_id: int | None = None
    arrival_wall_s: float = 0.0  # time.time() on arrival: start delays are timed from it
    # Wall-clock stamps of its first-token path here and on the worker (request_clock.HOPS);
    # they travel back to the engine in PrefillDone.hops.
    hops: dict[str, float] = field(default_factory=dict)
    preemptions: int = 0
    requested_slo_class: str | None = None  # set when admission control downgraded it
    workers: set[str] = field(default_factory=set)


class Scheduler:
    """See the module docstring. Created by ``FlowPrefillEngine.start``.

    Its parts (``UnitCalls``, ``FailureHandling``) read and change the state set up in
    ``__init__`` directly: they run on this actor's one event loop, so they need no locks.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        predictor: TTFTPredictor,
        prefill_workers: dict[str, object],
        decode_workers: dict[str, object],
    ):
        self.config = config
        self.predictor = predictor
        self.policy = make_policy(config.policy, predictor, slo=config.slo)
        # Prefix routing: the policy prices and routes requests by the block hashes of their
        # prompts (config validation makes the workers' caches match its block size).
        self._prefix_routing = config.policy.prefix.enabled
        # Every event and decision, for "why was this request late?" (bounded ring).
        self.timeline = Timeline.for_policy(self.policy, config.timeline.capacity)
        self._origin = time.monotonic()
        self._prefill = dict(prefill_workers)
        self._requests: dict[str, TrackedRequest] = {}
        # Ingress clients whose lease expired (cancel_client); bounded like any id memory.
        self._gone_clients: OrderedDict[str, None] = OrderedDict()
        # Units and what runs or waits paused on each worker: the policy's state (``unit``,
        # ``running_unit``, ``paused_units``), read there rather than mirrored here.
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._started = False
        self._ready = asyncio.Event()
        # This incarnation's stamp on every unit call: a restarted scheduler numbers its units
        # from 1 again, and the workers must not mistake a dead incarnation's calls for its own.
        self._epoch = time.time_ns()
        # Prefill workers that died and are being restarted by Ray (they rejoin when ready).
        self._rejoining: set[str] = set()
        transport = config.kv_transfer.mode
        self._kv_transport = None if transport == "object_store" else transport
        self._decode = DecodeHandoff(
            decode_workers, config.decode.max_batch_size, self._kv_transport, self._spawn
        )
        self._metrics = RuntimeMetrics()
        # Measurements for stats() (seconds) and the queue gauges.
        self._samples = SchedulerSamples()
        self._gauges = QueueGauges(self._metrics)
        self._counts: dict[str, int] = defaultdict(int)
        self._unit_calls = UnitCalls(self)
        self._failures = FailureHandling(self)

    # ----------------------------------------------------------------- public calls

    async def start(self) -> None:
        """Adopt the workers and announce the prefill workers to the policy (must run inside
        the actor's loop). Runs once per incarnation: Ray re-creates this actor from the same
        arguments when it restarts it, and the first call of the new one lands here."""
        if self._started:
            await self._ready.wait()
            return
        self._started = True
        context = ray.get_runtime_context()
        restarted = context.was_current_actor_reconstructed
        if restarted:
            self._counts["scheduler_restarts"] += 1
            logger.warning(
                "scheduler restarted: requests that were in prefill are lost (their clients got "
                "an error); the prefill workers drop what the previous scheduler left on them"
            )
        # Whatever a previous incarnation left on the workers (units, KV) has no owner now.
        dropped = await asyncio.gather(
            *(h.adopt.remote(self._epoch) for h in self._prefill.values()),
            return_exceptions=True,
        )
        budgets = {}
        for wid, answer in zip(list(self._prefill), dropped, strict=True):
            if isinstance(answer, BaseException):
                logger.error("prefill worker %s could not be adopted: %s", wid, answer)
                self._prefill.pop(wid)
                continue
            budgets[wid] = answer.pop("kv_budget")
            if answer["units"] or answer["kv_requests"]:
                logger.warning("prefill worker %s dropped orphaned state: %s", wid, answer)
        for wid, budget in budgets.items():
            self._handle(WorkerJoined(wid, budget))
        # Decode workers report their load back when requests finish; without that the
        # last accept reply would be all we knew, and it never goes down.
        me = context.current_actor
        await asyncio.gather(*(h.report_load_to.remote(me) for h in self._decode.handles))
        if restarted and self._kv_transport is not None:
            await self.setup_kv_transport()
        self._ready.set()

    def decode_load(self, decode_id: str, running: int, waiting: int, kv_usage: float) -> None:
        """A decode worker's load changed (a request finished or was freed)."""
        self._decode.update_load(decode_id, running, waiting, kv_usage)

    def now(self) -> float:
        """Seconds on the scheduler's monotonic clock (the policy's time base)."""
        return time.monotonic() - self._origin

    async def submit(self, asked: EngineRequest) -> PrefillDone | None:
        """Admit a request (validated by the engine: engine_request.py) and return when its
        first token exists (None if cancelled).

        Raises ``RequestRejectedError`` if the policy refuses it, ``DuplicateRequestError`` if
        the id is in flight, ``EngineUnavailableError`` once closed or out of prefill workers.
        """
        arrived = time.time()
        if self._closed or not (self._prefill or self._rejoining):
            raise EngineUnavailableError(
                "the scheduler is not accepting requests (no prefill workers or shut down)"
            )
        request_id = asked.request_id
        if request_id in self._requests:
            raise DuplicateRequestError(request_id)
        if asked.client_id is not None and asked.client_id in self._gone_clients:
            # Its replica stalled past its lease; it takes a new one on its next renewal.
            raise EngineUnavailableError("this ingress replica's lease expired; retry")
        await self.start()
        request = Request(
            request_id=request_id,
            arrival_s=self.now(),
            prompt_tokens=asked.prompt_tokens,
            max_output_tokens=asked.sampling.max_tokens,
            slo_class=asked.slo_class,
            # Resolved once, by the engine (the class's target unless an explicit one).
            ttft_slo_s=asked.ttft_slo_s,
            prefix_hashes=self._prefix_hashes(asked.prompt_ids, asked.cache_salt),
        )
        tracked = TrackedRequest(
            asked,
            request,
            asyncio.get_running_loop().create_future(),
            arrival_wall_s=arrived,
            hops={"scheduler_arrival": arrived},
        )
        self._requests[request_id] = tracked
        self._counts["submitted"] += 1
        self._handle(Arrival(request))
        try:
            return await asyncio.shield(tracked.done)
        except asyncio.CancelledError:
            # The caller went away (client disconnect): the request must not keep running.
            self._cancel(request_id)
            raise

    def _prefix_hashes(self, token_ids: tuple[int, ...], cache_salt: str | None) -> tuple[int, ...]:
        """The prompt's block hashes for the policy's prefix routing; none where the workers
        would not cache it (routing off, or an unsalted request with ``share_unsalted`` off)."""
        cache = self.config.prefill.prefix_cache
        if not self._prefix_routing or (cache_salt is None and not cache.share_unsalted):
            return ()
        return prefix_hashes(token_ids, cache.block_tokens, cache_salt or "")

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request still in prefill. Returns False if it is not (or no longer) here."""
        return self._cancel(request_id)

    async def cancel_client(self, client_id: str) -> int:
        """Cancel every request in prefill that the ingress client ``client_id`` submitted
        (its lease expired) and refuse any it still sends; returns how many were cancelled."""
        remember(self._gone_clients, client_id, _GONE_CLIENTS_MEMORY)
        ids = [
            rid for rid, tracked in self._requests.items() if tracked.asked.client_id == client_id
        ]
        return sum(self._cancel(request_id) for request_id in ids)

    def timeline_export(self, last: int | None = 200) -> dict:
        """The timeline of the ``last`` most recent requests (all kept when None): JSON-able,
        token counts only, never prompt text (``Timeline.export``)."""
        return self.timeline.export(last)

    def note_client_ttft(self, request_id: str, ttft_s: float) -> None:
        """The TTFT the client saw, from the engine: the why-late attribution tells the serving
        path's share apart with it. The engine sends it only for requests that missed."""
        self.timeline.note_client_ttft(request_id, ttft_s)

    async def setup_kv_transport(self) -> None:
        """Join every worker into one collective group for Ray Direct Transport of the KV.
        Created from this actor because it is the one that issues the tensor-transport calls."""
        from ray.experimental.collective import create_collective_group

        actors = [*self._prefill.values(), *self._decode.handles]
        backend = "torch_gloo" if self._kv_transport == "gloo" else "nccl"
        # A restarted scheduler makes its own group: the old one belonged to the dead process.
        name = f"{self.config.name_prefix}-kv-{self._epoch}"
        await asyncio.to_thread(create_collective_group, actors, backend, name)

    async def add_prefill_worker(self, worker_id: str, handle) -> None:
        """A new prefill worker joined (scale-up or a replacement)."""
        # A fresh process serves nobody's calls yet; its answer carries its KV budget.
        answer = await handle.adopt.remote(self._epoch)
        self._prefill[worker_id] = handle
        self._handle(WorkerJoined(worker_id, answer["kv_budget"]))

    async def close(self) -> None:
        """Refuse new requests and fail the pending ones (engine shutdown)."""
        self._closed = True
        for tracked in list(self._requests.values()):
            if not tracked.done.done():
                tracked.done.set_exception(EngineUnavailableError("the engine is shutting down"))
        self._requests.clear()

    def stats(self) -> dict:
        """Counters and raw samples (seconds) for the benchmark and tests."""
        return {
            "pid": os.getpid(),
            "epoch": self._epoch,
            "counts": dict(self._counts),
            "in_prefill": len(self._requests),
            "prefill_workers": sorted(self._prefill),
            "running_units": {w: self.running_unit(w) for w in self._prefill},
            "paused_units": {w: self.paused_units(w) for w in self._prefill},
            **self._samples.export(),
            "kv_transfers": list(self._decode.transfers),
            "decode_load": self._decode.export(),
            "predictor_correction": getattr(self.predictor, "correction", 1.0),
            "predictor_max_tokens": getattr(self.predictor, "max_tokens", None),
            # The policy's own counters (preemptions, evictions, rejects, ...) and states.
            "policy": self.policy.stats(),
        }

    # -------------------------------------------------------------- event handling

    def _handle(self, event: Event) -> None:
        started = time.perf_counter()
        now = self.now()
        decisions = self.policy.on_event(event, now)
        self.timeline.record(event, now, decisions)
        decided = time.perf_counter()
        for decision in decisions:
            self._dispatch(decision)
        finished = time.perf_counter()
        name = type(event).__name__
        self._samples.event(name, started, decided, finished)
        self._metrics.observe("flowprefill_scheduler_event_seconds", finished - started, event=name)
        self._gauges.refresh(finished, self.policy.workers, self._requests)

    def _dispatch(self, decision: Decision) -> None:
        if isinstance(decision, RunUnit):
            self._unit_calls.run(decision.unit)
        elif isinstance(decision, Preempt):
            self._unit_calls.preempt(decision.worker_id, decision.unit_id)
        elif isinstance(decision, Resume):
            self._unit_calls.resume(decision.worker_id, decision.unit_id)
        elif isinstance(decision, Discard):
            self._unit_calls.discard(decision.worker_id, decision.unit_id, decision.request_ids)
        elif isinstance(decision, Reject):
            self._reject(decision)
        elif isinstance(decision, Downgrade):
            self._downgrade(decision)
        elif isinstance(decision, Overtaken):
            # Demoted behind all feasible work (the timeline keeps by whom): nothing to tell a
            # worker, and it is still judged by its own target.
            self._counts["overtaken"] += 1
            if (tracked := self._requests.get(decision.request_id)) is not None:
                cls = tracked.request.slo_class
                self._metrics.inc("flowprefill_requests_overtaken_total", slo_class=cls)
        else:  # pragma: no cover - the contract has no other decisions
            raise TypeError(f"unknown decision {decision!r}")

    def _reject(self, decision: Reject) -> None:
        tracked = self._requests.pop(decision.request_id, None)
        if tracked is None:
            return
        self._counts["rejected"] += 1
        self._metrics.inc(
            "flowprefill_requests_rejected_total", slo_class=tracked.request.slo_class
        )
        tracked.done.set_exception(
            RequestRejectedError(decision.request_id, decision.reason, decision.retry_after_s)
        )
        # A request given up after admission (give_up.py) may have KV on a worker already.
        for worker_id in tracked.workers:
            self._unit_calls.drop(worker_id, decision.request_id)
        self._forget(decision.request_id)

    def _downgrade(self, decision: Downgrade) -> None:
        tracked = self._requests.get(decision.request_id)
        if tracked is None:
            return
        original = tracked.request.slo_class
        tracked.requested_slo_class = original
        # From here on the request is judged (SLO met/missed, metrics, client report) by the
        # class it is served under; the client is told which it asked for.
        tracked.request = tracked.request.model_copy(
            update={"slo_class": decision.slo_class, "ttft_slo_s": decision.ttft_slo_s}
        )
        self._counts["downgraded"] += 1
        self._metrics.inc(
            "flowprefill_requests_downgraded_total",
            slo_class=original,
            served_class=decision.slo_class,
        )

    def _cancel(self, request_id: str) -> bool:
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return False
        self._counts["cancelled"] += 1
        if not tracked.done.done():
            tracked.done.set_result(None)
        self._handle(Cancelled(request_id))
        # Finished or partial KV already sitting on a worker; KV inside a running or paused
        # unit is dropped when that unit completes or is discarded.
        for worker_id in tracked.workers:
            self._unit_calls.drop(worker_id, request_id)
        self._forget(request_id)
        return True

    # ------------------------------------------------------- the policy's unit state

    def unit(self, unit_id: int) -> WorkUnit | None:
        """A unit the policy still tracks (running, pausing or paused), else None."""
        record = self.policy.units.get(unit_id)
        return record.unit if record is not None else None

    def running_unit(self, worker_id: str) -> int | None:
        """The unit the worker runs, as sent to it: one queued behind a pausing unit (one-hop
        handover) already counts, since the worker starts it at the checkpoint on its own."""
        worker = self.policy.workers.get(worker_id)
        if worker is None:
            return None
        unit = worker.next or worker.running
        return unit.unit_id if unit is not None else None

    def paused_units(self, worker_id: str) -> list[int]:
        """Ids of the units paused on the worker, ascending."""
        worker = self.policy.workers.get(worker_id)
        return sorted(worker.paused) if worker is not None else []

    # ------------------------------------------------------------------- helpers

    def _forget(self, request_id: str, unit_gone: bool = False) -> None:
        """Let the policy drop a request that is over and in no live unit (bounded memory)."""
        try:
            view = self.policy.request_view(request_id)
        except KeyError:
            return
        if view.status.is_terminal and (unit_gone or view.unit_id is None):
            self.policy.forget(request_id)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("scheduler task failed", exc_info=task.exception())


RemoteScheduler = ray.remote(Scheduler)
