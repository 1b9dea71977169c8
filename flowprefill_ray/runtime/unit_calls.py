"""Carrying out the policy's unit decisions on the prefill workers, and acting on the answers.

A decision becomes a remote call (run, preempt, resume, discard) that is issued at once and
awaited in a task of the scheduler, so the event loop stays free for the next event. The
answer of a ``run``/``resume`` call is the unit's outcome: paused, or completed with the first
token of each request it finished. A first token ends the request's prefill: its SLO is judged,
it is handed to a decode worker (decode_handoff.py) and ``Scheduler.submit`` returns.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from flowprefill_ray.errors import RequestFailedError
from flowprefill_ray.scheduling.events import UnitCompleted, UnitPaused, WorkUnit

from .messages import FirstToken, PrefillDone, PrefillItemSpec, UnitOutcome
from .prefill_failures import WORKER_GONE

if TYPE_CHECKING:
    from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class UnitCalls:
    """Part of the ``Scheduler`` it is given: issues its unit calls and acts on the answers,
    reading and changing that scheduler's requests and prefill workers directly (one actor,
    one event loop, so no locks). Which units exist, run or are paused on which worker is the
    policy's state (``Scheduler.unit``, ``policy.workers``): read there, never copied here."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    # ---------------------------------------------------------------- decisions

    def run(self, unit: WorkUnit) -> None:
        s = self._scheduler
        items = []
        now = s.now()
        dispatched = time.time()
        for item in unit.items:
            tracked = s._requests[item.request_id]
            if tracked.first_run_s is None:
                tracked.first_run_s = now
                tracked.first_unit_id = unit.unit_id
                tracked.hops["unit_dispatch"] = dispatched
                queue_s = now - tracked.request.arrival_s
                s._metrics.observe(
                    "flowprefill_request_queue_time_seconds",
                    queue_s,
                    slo_class=tracked.request.slo_class,
                )
            tracked.workers.add(unit.worker_id)
            asked = tracked.asked
            ids = asked.prompt_ids
            items.append(
                PrefillItemSpec(
                    item.request_id,
                    item.start,
                    item.end,
                    ids[item.start : item.end],
                    asked.prompt_tokens,
                    asked.sampling,
                    asked.cache_salt,
                    # A whole prompt the policy started at a cached prefix (policy.prefix): the
                    # worker needs the prefix's tokens to find it, or to compute it if gone.
                    ids[: item.start]
                    if s._prefix_routing and 0 < item.start and item.end == len(ids)
                    else (),
                )
            )
        # A unit the policy queued behind a pausing one was sent with that one's preempt
        # (one-hop handover): the worker starts it at the checkpoint, with no further call.
        queued = s.policy.workers[unit.worker_id].next
        handover = queued is not None and queued.unit_id == unit.unit_id
        s._counts["units"] += 1
        s._metrics.observe("flowprefill_prefill_batch_size", len(unit.items))
        s._metrics.observe("flowprefill_prefill_batch_tokens", unit.tokens)
        handle = s._prefill[unit.worker_id]
        call = handle.run.remote(unit.unit_id, items, s._epoch)
        s._spawn(self._await_unit(unit.worker_id, unit.unit_id, call, handover))

    def preempt(self, worker_id: str, unit_id: int) -> None:
        s = self._scheduler
        s._counts["preempt_decisions"] += 1
        handle = s._prefill.get(worker_id)
        if handle is not None:
            # Sent now, not from a task on the next loop turn: every millisecond here is
            # preemption latency.
            s._spawn(self._preempt(worker_id, handle.preempt.remote(unit_id, s._epoch)))

    def resume(self, worker_id: str, unit_id: int) -> None:
        s = self._scheduler
        handle = s._prefill[worker_id]
        s._spawn(self._await_unit(worker_id, unit_id, handle.resume.remote(unit_id, s._epoch)))

    def discard(self, worker_id: str, unit_id: int, request_ids: tuple[str, ...]) -> None:
        """``request_ids``: the unit's members (the policy has forgotten the unit already)."""
        s = self._scheduler
        s._spawn(self._discard(worker_id, unit_id, request_ids))
        for rid in request_ids:
            s._forget(rid, unit_gone=True)

    def drop(self, worker_id: str, request_id: str) -> None:
        """Free whatever the worker holds of the request (finished or partial KV)."""
        self._scheduler._spawn(self._drop(worker_id, request_id))

    # ------------------------------------------------------------------ answers

    async def _await_unit(self, worker_id: str, unit_id: int, call, handover=None) -> None:
        """``handover``: for a ``run`` call, whether it was sent behind a preempted unit (then
        start delays are recorded under ``after_preempt``); None for a resume."""
        s = self._scheduler
        try:
            outcome: UnitOutcome = await call
            answered = time.time()  # a first token's "scheduler_first_token" hop
        except WORKER_GONE:
            s._failures.worker_failed(worker_id)
            return
        except Exception as error:  # a bug or a bad request inside the worker
            logger.exception("prefill unit %s failed on %s", unit_id, worker_id)
            s._failures.unit_failed(worker_id, unit_id, error)
            return
        if worker_id not in s._prefill:
            return  # the worker was declared failed meanwhile; the policy re-queued its work
        if handover is not None:
            self._start_delays(unit_id, outcome.started_wall_s, handover)
        if outcome.status == "paused":
            self._paused(worker_id, outcome)
        else:
            self._completed(worker_id, outcome, answered)

    def _paused(self, worker_id: str, outcome: UnitOutcome) -> None:
        s = self._scheduler
        s._samples.preemption(outcome.blocking_s, outcome.block_s)
        s._counts["preemptions"] += 1
        s._metrics.inc("flowprefill_preemptions_total", worker_id=worker_id)
        s._metrics.observe(
            "flowprefill_preemption_blocking_seconds", outcome.blocking_s, worker_id=worker_id
        )
        unit = s.unit(outcome.unit_id)
        for rid in unit.request_ids if unit else ():
            if rid in s._requests:
                s._requests[rid].preemptions += 1
        s._handle(UnitPaused(worker_id, outcome.unit_id, outcome.executed_s, outcome.blocking_s))

    def _completed(self, worker_id: str, outcome: UnitOutcome, answered: float) -> None:
        s = self._scheduler
        unit = s.unit(outcome.unit_id)  # the policy forgets it on the UnitCompleted below
        # Tokens the worker's prefix cache served: not computed, so not in the compute time
        # the prediction is judged against (the policy does not price them yet).
        cached = sum(tokens for _, tokens in outcome.cached_tokens)
        if cached:
            s._counts["prefix_cache_hit_tokens"] += cached
        if unit is not None:
            predicted = s.predictor.predict(max(1, unit.tokens - cached))
            if predicted > 0 and outcome.executed_s > 0:
                s._metrics.observe(
                    "flowprefill_ttft_prediction_ratio", outcome.executed_s / predicted
                )
            s._metrics.inc("flowprefill_prompt_tokens_total", unit.tokens)
        rids = unit.request_ids if unit else ()
        # Requests cancelled while their unit ran (decided before first tokens are taken out).
        cancelled = [rid for rid in rids if rid not in s._requests]
        # Members whose own prefill failed (the worker isolated them): they fail alone, before
        # the policy hears of the completion, so it does not treat them as served.
        for failed in outcome.failed:
            logger.error(
                "prefill of %s failed on %s: %s", failed.request_id, worker_id, failed.detail
            )
            s._failures.fail_request(failed.request_id)
        # Hand-offs first: their KV take-outs then reach the worker before the next unit the
        # policy starts there, which its KV budget counts on having free.
        for first in outcome.first_tokens:
            self._first_token(worker_id, first, (outcome.ended_wall_s, answered))
        s._handle(UnitCompleted(worker_id, outcome.unit_id, outcome.executed_s))
        for rid in cancelled:
            self.drop(worker_id, rid)  # their KV must not stay on the worker
        for rid in rids:
            s._forget(rid)

    def _first_token(self, worker_id: str, first: FirstToken, stamps: tuple[float, float]) -> None:
        """``stamps``: (the unit's end on the worker, its outcome's arrival here), wall clock.

        The SLO is not judged here: the engine judges it on the client's TTFT clock, the one
        the API reports (request_clock.py)."""
        s = self._scheduler
        tracked = s._requests.pop(first.request_id, None)
        if tracked is None:  # cancelled meanwhile; _completed drops its KV
            return
        request = tracked.request
        now = s.now()
        hops = tracked.hops
        hops["worker_end"], hops["scheduler_first_token"] = stamps
        decode_id = None
        if first.finish_reason is None:
            decode_id = s._decode.pick()
            try:
                s._decode.send(s._prefill[worker_id], decode_id, tracked, first)
            except Exception as error:  # e.g. a transport misconfiguration: fail loudly, not hang
                logger.exception("hand-off of %s failed", request.request_id)
                tracked.done.set_exception(
                    RequestFailedError(f"KV hand-off of {request.request_id} failed: {error}")
                )
                return
            hops["decode_handoff"] = time.time()
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
                tracked.preemptions,
                request.ttft_target_s,
                request.slo_class,
                tracked.requested_slo_class,
                hops,
                first.shown,
                first.text,
            )
        )

    # ---------------------------------------------------------- control calls

    def _start_delays(self, unit_id: int, started_wall_s: float, handover: bool) -> None:
        """From each request's arrival at this scheduler to its first unit starting to compute
        on the worker (both ``time.time()``; one host in the tests and benchmarks)."""
        s = self._scheduler
        unit = s.unit(unit_id)
        for rid in unit.request_ids if unit else ():
            tracked = s._requests.get(rid)
            if tracked is not None and tracked.first_unit_id == unit_id and started_wall_s:
                s._samples.start_delay(rid, started_wall_s - tracked.arrival_wall_s, handover)
                tracked.hops["worker_start"] = started_wall_s

    async def _preempt(self, worker_id: str, call) -> None:
        s = self._scheduler
        try:
            await call
        except WORKER_GONE:
            s._failures.worker_failed(worker_id)
        # The run/resume call of the unit returns with status "paused" (or "completed"); that
        # return, not this one, is the event the policy hears.

    async def _discard(self, worker_id: str, unit_id: int, request_ids: tuple[str, ...]) -> None:
        s = self._scheduler
        handle = s._prefill.get(worker_id)
        if handle is None:
            return
        try:
            await handle.discard.remote(unit_id, s._epoch)
            for rid in request_ids:
                if rid not in s._requests:
                    await handle.drop_request.remote(rid)
        except WORKER_GONE:
            s._failures.worker_failed(worker_id)

    async def _drop(self, worker_id: str, request_id: str) -> None:
        s = self._scheduler
        handle = s._prefill.get(worker_id)
        if handle is not None:
            try:
                await handle.drop_request.remote(request_id)
            except WORKER_GONE:
                s._failures.worker_failed(worker_id)
