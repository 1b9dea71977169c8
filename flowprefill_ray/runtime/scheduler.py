"""The global scheduler actor: the only place prefill decisions are made.

One named async actor. It runs the scheduling policy object unchanged (the same class the
simulator drives) and calls it only on events: a request arrives, a unit completes or pauses,
a worker joins or fails, a request is cancelled. It stamps arrivals on its own monotonic clock,
turns each decision into calls on the prefill workers, and, when a prefill completes, hands the
request to the least-loaded decode worker: it forwards the ObjectRef of the KV, never the KV.

Its own cost is measured per event: the time inside ``policy.on_event`` plus dispatching the
decisions (issuing the remote calls, not waiting for them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from flowprefill_ray.model.sampling import SamplingParams
from flowprefill_ray.scheduling import Request, TTFTPredictor, make_policy
from flowprefill_ray.scheduling.events import (
    Arrival,
    Cancelled,
    Decision,
    Discard,
    Downgrade,
    Event,
    Preempt,
    Reject,
    Resume,
    RunUnit,
    UnitCompleted,
    UnitPaused,
    WorkerJoined,
    WorkerLeft,
    WorkUnit,
)
from flowprefill_ray.scheduling.timeline import Timeline

from .config import RuntimeConfig
from .errors import (
    DuplicateRequestError,
    EngineUnavailableError,
    RequestFailedError,
    RequestRejectedError,
)
from .messages import AcceptAck, FirstToken, Handoff, PrefillDone, PrefillItemSpec, UnitOutcome
from .metrics import RuntimeMetrics
from .rejoin import wait_until_restarted

logger = logging.getLogger(__name__)

_WORKER_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
# Samples kept for stats(): enough for percentiles of a benchmark run, bounded for a server.
_SAMPLES = 20000
# Queue gauges are refreshed at most this often (seconds): counting the queue is O(requests),
# too much to repeat on every event under load, and Prometheus scrapes far less often anyway.
_GAUGE_PERIOD_S = 0.1


@dataclass
class _Tracked:
    """A request from arrival until its first token (then the decode worker owns it)."""

    request: Request
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    done: asyncio.Future
    first_run_s: float | None = None
    preemptions: int = 0
    requested_slo_class: str | None = None  # set when admission control downgraded it
    workers: set[str] = field(default_factory=set)


@dataclass
class _DecodeLoad:
    """The scheduler's view of one decode worker: last reported load plus hand-offs in flight."""

    handle: object
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0

    def score(self, max_batch: int) -> float:
        # KV memory and queue length both limit how soon a new request gets decode steps.
        return self.kv_usage + (self.running + self.waiting + self.in_flight) / max_batch


class Scheduler:
    """See the module docstring. Created by ``FlowPrefillEngine.start``."""

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
        # Every event and decision, for "why was this request late?" (bounded ring).
        self.timeline = Timeline.for_policy(self.policy, config.timeline.capacity)
        self._origin = time.monotonic()
        self._prefill = dict(prefill_workers)
        self._decode = {wid: _DecodeLoad(handle) for wid, handle in decode_workers.items()}
        self._requests: dict[str, _Tracked] = {}
        self._units: dict[int, WorkUnit] = {}
        self._running_unit: dict[str, int | None] = {wid: None for wid in self._prefill}
        self._paused_units: dict[str, set[int]] = {wid: set() for wid in self._prefill}
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
        self._metrics = RuntimeMetrics()
        # Measurements for stats() (seconds).
        self._event_seconds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=_SAMPLES))
        self._policy_seconds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=_SAMPLES))
        self._gauges_at = 0.0
        self._blocking_s: deque[float] = deque(maxlen=_SAMPLES)
        self._block_in_flight_s: deque[float] = deque(maxlen=_SAMPLES)
        self._transfers: deque[tuple[int, float]] = deque(maxlen=_SAMPLES)
        self._counts: dict[str, int] = defaultdict(int)

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
        for wid, answer in zip(list(self._prefill), dropped, strict=True):
            if isinstance(answer, BaseException):
                logger.error("prefill worker %s could not be adopted: %s", wid, answer)
                self._prefill.pop(wid)
                self._running_unit.pop(wid, None)
                self._paused_units.pop(wid, None)
            elif answer["units"] or answer["kv_requests"]:
                logger.warning("prefill worker %s dropped orphaned state: %s", wid, answer)
        for wid in self._prefill:
            self._handle(WorkerJoined(wid))
        # Decode workers report their load back when requests finish; without that the
        # last accept reply would be all we knew, and it never goes down.
        me = context.current_actor
        await asyncio.gather(*(d.handle.report_load_to.remote(me) for d in self._decode.values()))
        if restarted and self._kv_transport is not None:
            await self.setup_kv_transport()
        self._ready.set()

    def decode_load(self, decode_id: str, running: int, waiting: int, kv_usage: float) -> None:
        """A decode worker's load changed (a request finished or was freed)."""
        load = self._decode.get(decode_id)
        if load is not None:
            load.running, load.waiting, load.kv_usage = running, waiting, kv_usage

    def now(self) -> float:
        """Seconds on the scheduler's monotonic clock (the policy's time base)."""
        return time.monotonic() - self._origin

    async def submit(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        slo_class: str,
        ttft_slo_s: float | None = None,
    ) -> PrefillDone | None:
        """Admit a request and return when its first token exists (None if cancelled).

        Raises ``RequestRejectedError`` if the policy refuses it, ``DuplicateRequestError`` if
        the id is in flight, ``EngineUnavailableError`` once closed or out of prefill workers.
        """
        if self._closed or not (self._prefill or self._rejoining):
            raise EngineUnavailableError(
                "the scheduler is not accepting requests (no prefill workers or shut down)"
            )
        if request_id in self._requests:
            raise DuplicateRequestError(request_id)
        await self.start()
        request = Request(
            request_id=request_id,
            arrival_s=self.now(),
            prompt_tokens=len(token_ids),
            max_output_tokens=sampling.max_tokens,
            slo_class=slo_class,
            ttft_slo_s=ttft_slo_s,
        ).with_slo(self.config.slo)
        tracked = _Tracked(
            request, tuple(token_ids), sampling, asyncio.get_running_loop().create_future()
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

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request still in prefill. Returns False if it is not (or no longer) here."""
        return self._cancel(request_id)

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

        actors = [*self._prefill.values(), *(d.handle for d in self._decode.values())]
        backend = "torch_gloo" if self._kv_transport == "gloo" else "nccl"
        # A restarted scheduler makes its own group: the old one belonged to the dead process.
        name = f"{self.config.name_prefix}-kv-{self._epoch}"
        await asyncio.to_thread(create_collective_group, actors, backend, name)

    async def add_prefill_worker(self, worker_id: str, handle) -> None:
        """A new prefill worker joined (scale-up or a replacement)."""
        await handle.adopt.remote(self._epoch)  # a fresh process serves nobody's calls yet
        self._prefill[worker_id] = handle
        self._running_unit[worker_id] = None
        self._paused_units[worker_id] = set()
        self._handle(WorkerJoined(worker_id))

    async def close(self) -> None:
        """Refuse new requests and fail the pending ones (engine shutdown)."""
        self._closed = True
        for tracked in list(self._requests.values()):
            if not tracked.done.done():
                tracked.done.set_exception(EngineUnavailableError("the engine is shutting down"))
        self._requests.clear()

    def stats(self) -> dict:
        """Counters and raw samples (seconds) for the benchmark and tests."""
        overhead = {name: list(values) for name, values in self._event_seconds.items()}
        policy_only = {name: list(values) for name, values in self._policy_seconds.items()}
        return {
            "pid": os.getpid(),
            "epoch": self._epoch,
            "counts": dict(self._counts),
            "in_prefill": len(self._requests),
            "prefill_workers": sorted(self._prefill),
            "running_units": {w: u for w, u in self._running_unit.items()},
            "paused_units": {w: sorted(u) for w, u in self._paused_units.items()},
            "event_overhead_s": overhead,
            "policy_decision_s": policy_only,
            "preemption_blocking_s": list(self._blocking_s),
            # The block each of those preemptions waited for, measured in the worker.
            "preemption_block_in_flight_s": list(self._block_in_flight_s),
            "kv_transfers": list(self._transfers),
            "decode_load": {
                wid: {
                    "running": d.running,
                    "waiting": d.waiting,
                    "kv_usage": d.kv_usage,
                    "in_flight": d.in_flight,
                }
                for wid, d in self._decode.items()
            },
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
        self._event_seconds[name].append(finished - started)
        # The policy's share alone: dispatching is mostly Ray's cost of issuing remote calls.
        self._policy_seconds[name].append(decided - started)
        self._metrics.observe("flowprefill_scheduler_event_seconds", finished - started, event=name)
        if finished - self._gauges_at >= _GAUGE_PERIOD_S:
            self._gauges_at = finished
            self._report_gauges()

    def _dispatch(self, decision: Decision) -> None:
        if isinstance(decision, RunUnit):
            self._run(decision.unit)
        elif isinstance(decision, Preempt):
            self._counts["preempt_decisions"] += 1
            self._spawn(self._preempt(decision.worker_id, decision.unit_id))
        elif isinstance(decision, Resume):
            self._paused_units[decision.worker_id].discard(decision.unit_id)
            self._running_unit[decision.worker_id] = decision.unit_id
            handle = self._prefill[decision.worker_id]
            self._spawn(
                self._await_unit(
                    decision.worker_id,
                    decision.unit_id,
                    handle.resume.remote(decision.unit_id, self._epoch),
                )
            )
        elif isinstance(decision, Discard):
            self._paused_units.get(decision.worker_id, set()).discard(decision.unit_id)
            unit = self._units.pop(decision.unit_id, None)
            self._spawn(self._discard(decision.worker_id, decision.unit_id, unit))
            for rid in unit.request_ids if unit else ():
                self._forget(rid, unit_gone=True)
        elif isinstance(decision, Reject):
            self._reject(decision)
        elif isinstance(decision, Downgrade):
            self._downgrade(decision)
        else:  # pragma: no cover - the contract has no other decisions
            raise TypeError(f"unknown decision {decision!r}")

    def _run(self, unit: WorkUnit) -> None:
        items = []
        now = self.now()
        for item in unit.items:
            tracked = self._requests[item.request_id]
            if tracked.first_run_s is None:
                tracked.first_run_s = now
                queue_s = now - tracked.request.arrival_s
                self._metrics.observe(
                    "flowprefill_request_queue_time_seconds",
                    queue_s,
                    slo_class=tracked.request.slo_class,
                )
            tracked.workers.add(unit.worker_id)
            items.append(
                PrefillItemSpec(
                    item.request_id,
                    item.start,
                    item.end,
                    tracked.token_ids[item.start : item.end],
                    tracked.request.prompt_tokens,
                    tracked.sampling,
                )
            )
        self._units[unit.unit_id] = unit
        self._running_unit[unit.worker_id] = unit.unit_id
        self._counts["units"] += 1
        self._metrics.observe("flowprefill_prefill_batch_size", len(unit.items))
        self._metrics.observe("flowprefill_prefill_batch_tokens", unit.tokens)
        handle = self._prefill[unit.worker_id]
        self._spawn(
            self._await_unit(
                unit.worker_id, unit.unit_id, handle.run.remote(unit.unit_id, items, self._epoch)
            )
        )

    async def _await_unit(self, worker_id: str, unit_id: int, call) -> None:
        try:
            outcome: UnitOutcome = await call
        except _WORKER_GONE:
            self._worker_failed(worker_id)
            return
        except Exception as error:  # a bug or a bad request inside the worker
            logger.exception("prefill unit %s failed on %s", unit_id, worker_id)
            self._unit_failed(worker_id, unit_id, error)
            return
        if worker_id not in self._prefill:
            return  # the worker was declared failed meanwhile; the policy re-queued its work
        if self._running_unit.get(worker_id) == unit_id:
            self._running_unit[worker_id] = None
        if outcome.status == "paused":
            self._paused(worker_id, outcome)
        else:
            self._completed(worker_id, outcome)

    def _paused(self, worker_id: str, outcome: UnitOutcome) -> None:
        self._paused_units[worker_id].add(outcome.unit_id)
        self._blocking_s.append(outcome.blocking_s)
        self._block_in_flight_s.append(outcome.block_s)
        self._counts["preemptions"] += 1
        self._metrics.inc("flowprefill_preemptions_total", worker_id=worker_id)
        self._metrics.observe(
            "flowprefill_preemption_blocking_seconds", outcome.blocking_s, worker_id=worker_id
        )
        unit = self._units.get(outcome.unit_id)
        for rid in unit.request_ids if unit else ():
            if rid in self._requests:
                self._requests[rid].preemptions += 1
        self._handle(UnitPaused(worker_id, outcome.unit_id, outcome.executed_s, outcome.blocking_s))

    def _completed(self, worker_id: str, outcome: UnitOutcome) -> None:
        unit = self._units.pop(outcome.unit_id, None)
        if unit is not None:
            predicted = self.predictor.predict(unit.tokens)
            if predicted > 0 and outcome.executed_s > 0:
                self._metrics.observe(
                    "flowprefill_ttft_prediction_ratio", outcome.executed_s / predicted
                )
            self._metrics.inc("flowprefill_prompt_tokens_total", unit.tokens)
        rids = unit.request_ids if unit else ()
        # Requests cancelled while their unit ran (decided before first tokens are taken out).
        cancelled = [rid for rid in rids if rid not in self._requests]
        # Members whose own prefill failed (the worker isolated them): they fail alone, before
        # the policy hears of the completion, so it does not treat them as served.
        for failed in outcome.failed:
            logger.error(
                "prefill of %s failed on %s: %s", failed.request_id, worker_id, failed.detail
            )
            self._fail_request(failed.request_id)
        self._handle(UnitCompleted(worker_id, outcome.unit_id, outcome.executed_s))
        for first in outcome.first_tokens:
            self._first_token(worker_id, first)
        for rid in cancelled:
            self._spawn(self._drop(worker_id, rid))  # their KV must not stay on the worker
        for rid in rids:
            self._forget(rid)

    def _first_token(self, worker_id: str, first: FirstToken) -> None:
        tracked = self._requests.pop(first.request_id, None)
        if tracked is None:  # cancelled meanwhile; _completed drops its KV
            return
        request = tracked.request
        now = self.now()
        ttft_s = now - request.arrival_s
        met = ttft_s <= request.ttft_target_s
        self._counts["slo_met" if met else "slo_missed"] += 1
        self._metrics.inc(
            "flowprefill_slo_met_total" if met else "flowprefill_slo_missed_total",
            slo_class=request.slo_class,
        )
        decode_id = None
        if first.finish_reason is None:
            decode_id = self._pick_decode()
            try:
                self._handoff(worker_id, decode_id, tracked, first)
            except Exception as error:  # e.g. a transport misconfiguration: fail loudly, not hang
                logger.exception("hand-off of %s failed", request.request_id)
                tracked.done.set_exception(
                    RequestFailedError(f"KV hand-off of {request.request_id} failed: {error}")
                )
                return
        queue_s = (
            tracked.first_run_s if tracked.first_run_s is not None else now
        ) - request.arrival_s
        tracked.done.set_result(
            PrefillDone(
                request.request_id,
                first.token_id,
                first.finish_reason,
                decode_id,
                queue_s,
                ttft_s,
                tracked.preemptions,
                request.ttft_target_s,
                request.slo_class,
                tracked.requested_slo_class,
            )
        )

    def _pick_decode(self) -> str:
        max_batch = self.config.decode.max_batch_size
        return min(self._decode, key=lambda wid: self._decode[wid].score(max_batch))

    def _handoff(
        self, prefill_id: str, decode_id: str, tracked: _Tracked, first: FirstToken
    ) -> None:
        handoff = Handoff(
            tracked.request.request_id,
            first.token_id,
            tracked.request.prompt_tokens,
            tracked.sampling,
            tracked.request.slo_class,
            first.generator_state,
            time.time(),
        )
        take = self._prefill[prefill_id].take_kv
        load = self._decode[decode_id]
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
        load = self._decode.get(decode_id)
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
        self._transfers.append((ack.kv_bytes, ack.transfer_s))

    async def _preempt(self, worker_id: str, unit_id: int) -> None:
        handle = self._prefill.get(worker_id)
        if handle is None:
            return
        try:
            await handle.preempt.remote(unit_id, self._epoch)
        except _WORKER_GONE:
            self._worker_failed(worker_id)
        # The run/resume call of the unit returns with status "paused" (or "completed"); that
        # return, not this one, is the event the policy hears.

    async def _discard(self, worker_id: str, unit_id: int, unit: WorkUnit | None) -> None:
        handle = self._prefill.get(worker_id)
        if handle is None:
            return
        try:
            await handle.discard.remote(unit_id, self._epoch)
            for rid in unit.request_ids if unit else ():
                if rid not in self._requests:
                    await handle.drop_request.remote(rid)
        except _WORKER_GONE:
            self._worker_failed(worker_id)

    async def _drop(self, worker_id: str, request_id: str) -> None:
        handle = self._prefill.get(worker_id)
        if handle is not None:
            try:
                await handle.drop_request.remote(request_id)
            except _WORKER_GONE:
                self._worker_failed(worker_id)

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
            self._spawn(self._drop(worker_id, request_id))
        self._forget(request_id)
        return True

    def _worker_failed(self, worker_id: str) -> None:
        if worker_id not in self._prefill:
            return
        logger.error("prefill worker %s is gone; its work is re-queued", worker_id)
        handle = self._prefill.pop(worker_id)
        self._running_unit.pop(worker_id, None)
        self._paused_units.pop(worker_id, None)
        for unit_id in [u for u, unit in self._units.items() if unit.worker_id == worker_id]:
            del self._units[unit_id]  # the policy re-queues their requests on WorkerLeft
        self._counts["workers_lost"] += 1
        self._handle(WorkerLeft(worker_id))
        if self.config.faults.worker_max_restarts != 0 and not self._closed:
            self._rejoining.add(worker_id)
            self._spawn(self._rejoin(worker_id, handle))
        self._fail_all_if_no_worker()

    async def _rejoin(self, worker_id: str, handle) -> None:
        """Wait for Ray to restart a dead prefill worker, then give it work again."""
        info = await wait_until_restarted(worker_id, handle, self.config.faults.rejoin_timeout_s)
        self._rejoining.discard(worker_id)
        if info is not None and not self._closed and worker_id not in self._prefill:
            logger.warning(
                "prefill worker %s restarted (pid %s) and rejoins", worker_id, info["pid"]
            )
            try:
                await self.add_prefill_worker(worker_id, handle)
                self._counts["workers_rejoined"] += 1
            except _WORKER_GONE:
                logger.error("prefill worker %s died again before it could rejoin", worker_id)
        self._fail_all_if_no_worker()

    def _fail_all_if_no_worker(self) -> None:
        # Requests wait for a restarting worker (bounded by rejoin_timeout_s), never forever.
        if not self._prefill and not self._rejoining:
            for tracked in list(self._requests.values()):
                if not tracked.done.done():
                    tracked.done.set_exception(
                        EngineUnavailableError("every prefill worker is gone")
                    )
            self._requests.clear()

    def _unit_failed(self, worker_id: str, unit_id: int, error: Exception) -> None:
        # The worker isolates per-request failures itself (``UnitOutcome.failed``); reaching
        # here means the unit as a whole broke, and the worker has already released it.
        unit = self._units.pop(unit_id, None)
        if self._running_unit.get(worker_id) == unit_id:
            self._running_unit[worker_id] = None
        for rid in unit.request_ids if unit else ():
            self._fail_request(rid)
        # The worker is idle again; the policy frees it on the unit's completion.
        self._handle(UnitCompleted(worker_id, unit_id, 0.0))

    def _fail_request(self, request_id: str) -> None:
        """End one request with an error. The client sees a generic message and its request
        id; the cause is in this actor's log (it may hold internals: paths, tracebacks)."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        # Counted in stats here; the metric (finish_reason="error") is counted where the
        # client's stream ends, in the engine, so that decode failures count too.
        self._counts["failed"] += 1
        if not tracked.done.done():
            tracked.done.set_exception(
                RequestFailedError(f"the prefill of request {request_id} failed")
            )
        self.timeline.note_failed(request_id, self.now())
        self._handle(Cancelled(request_id))

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

    def _report_gauges(self) -> None:
        in_units = set()
        for wid in self._prefill:
            running = self._units.get(self._running_unit.get(wid) or -1)
            paused = [self._units[u] for u in self._paused_units.get(wid, ()) if u in self._units]
            in_units.update(running.request_ids if running else ())
            for unit in paused:
                in_units.update(unit.request_ids)
            self._metrics.set(
                "flowprefill_prefill_requests_running",
                len(running.items) if running else 0,
                worker_id=wid,
            )
            self._metrics.set(
                "flowprefill_prefill_requests_paused",
                sum(len(u.items) for u in paused),
                worker_id=wid,
            )
        waiting = sum(1 for rid in self._requests if rid not in in_units)
        self._metrics.set("flowprefill_prefill_requests_waiting", waiting)


RemoteScheduler = ray.remote(Scheduler)
