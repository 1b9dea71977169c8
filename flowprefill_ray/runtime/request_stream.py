"""One request's token stream as the client sees it: ``TokenOutput``, ``RequestStream`` and
the generator behind them (``stream_tokens``), which ``FlowPrefillEngine.submit`` starts.

The first token comes from the scheduler as soon as the prefill completes (before the KV has
reached a decode worker); the rest stream straight from the decode worker. Every wait is bounded
by the request's deadline, and a stream that ends early (an error, or its consumer went away)
cancels the request so that nothing it held stays behind. How each request ended is counted
here, on the client side, so that prefill and decode failures alike are counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray.exceptions import RayActorError

from flowprefill_ray.engine_request import EngineRequest
from flowprefill_ray.errors import (
    InvalidRequestError,
    RequestFailedError,
    RequestRejectedError,
    RequestTimeoutError,
)
from flowprefill_ray.request_clock import RequestClock

from .deadline import RequestDeadline
from .messages import PrefillDone, TokenEvent
from .metrics import RuntimeMetrics

if TYPE_CHECKING:
    from .engine import FlowPrefillEngine


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One streamed output token (or the final event) of a request.

    ``token_id`` is None on a final event that carries no token (EOS, a stop string, abort).
    ``text`` is the text delta. Times in seconds, measured by this client: ``ttft_s`` from the
    request's ``RequestClock`` start (the ``submit`` call, or the HTTP request's arrival at the
    ingress) to the first token, ``tpot_s`` the mean time per output token after the first
    so far. ``queue_s`` (arrival to first run) and ``preemptions`` come from the scheduler.
    ``slo_class``/``ttft_slo_s`` are what the request is served under; ``downgraded_from`` names
    the class it asked for when admission control moved it to a looser one (else None).
    ``slo_met``: ``ttft_s <= ttft_slo_s``, judged once when the first token arrived (the same
    judgement the SLO counters record; None before a first token). ``hops``: the wall-clock
    stamps of its first-token path (``request_clock.HOPS``).
    """

    request_id: str
    token_id: int | None
    text: str
    index: int
    finish_reason: str | None
    ttft_s: float
    tpot_s: float | None
    queue_s: float
    preemptions: int
    slo_class: str
    ttft_slo_s: float
    downgraded_from: str | None = None
    slo_met: bool | None = None
    hops: dict[str, float] | None = None


class RequestStream:
    """The token stream of one submitted request: an async iterator of ``TokenOutput``.

    Awaiting it returns itself, so ``stream = await engine.submit(...)`` works as well as
    ``async for out in engine.submit(...)``. ``aclose()`` abandons the request (cancels it).
    """

    def __init__(self, request_id: str, outputs: AsyncIterator[TokenOutput]):
        self.request_id = request_id
        self._outputs = outputs

    def __await__(self):
        return self._itself().__await__()

    async def _itself(self) -> RequestStream:
        return self

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenOutput:
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        await self._outputs.aclose()


async def stream_tokens(
    engine: FlowPrefillEngine, request: EngineRequest, clock: RequestClock
) -> AsyncIterator[TokenOutput]:
    """The outputs of one validated request, from ``engine.submit`` to its last token.

    Submits to the scheduler, yields the first token from its answer and the rest from the
    decode worker, bounds every wait by the request's deadline, counts how the request ended,
    and frees what it held when it ends early (an error, or the consumer went away). The TTFT
    is measured once, on ``clock``, and judged against the SLO here (request_clock.py). The
    first token's text and whether it ends the request come decided from the prefill worker
    (output_rules.py)."""
    request_id, slo_class = request.request_id, request.slo_class
    started = clock.started_s
    finished = False
    done = None
    bound = RequestDeadline(request_id, request.timeout_s, started)
    engine._in_flight.add(request_id)
    try:
        clock.mark("engine_submit")
        done = await bound.wait(engine._call(engine._scheduler.submit.remote(request)))
        if done is None:  # cancelled before its first token
            finished = True
            _count_finished(engine._metrics, slo_class, "abort")
            yield _output(done, request_id, None, "", 0, "abort", started, None, slo_class)
            return
        first_at = time.monotonic()
        ttft_s = first_at - started
        clock.mark("engine_first_token")
        clock.hops.update(done.hops or {})
        judged = (_judge_slo(engine, done, ttft_s), clock.hops)
        token = done.first_token if done.first_shown else None
        if done.finish_reason is None:
            # From here on a cancel goes to the decode worker (even before its hand-off
            # lands there: the worker then drops the late hand-off).
            decode_worker = engine._decode_handle(done.decode_worker_id)
            engine._in_decode[request_id] = decode_worker
        else:
            # The request ended with its first token: recorded before the yield (a consumer
            # may stop at the final output).
            finished = True
            _record(engine._metrics, done, ttft_s, None, started, done.finish_reason)
        yield _output(
            done,
            request_id,
            token,
            done.first_text,
            0,
            done.finish_reason,
            started,
            ttft_s,
            slo_class,
            judged=judged,
        )
        if finished:
            return
        tpot_s = None
        index = 0
        async for event in bound.iterate(_decode_events(decode_worker, request_id)):
            # An abort/error event has no position of its own: it follows the last token.
            index = event.index if event.index >= 0 else index + 1
            if event.token_id is not None:
                tpot_s = (time.monotonic() - first_at) / index
            out = _output(
                done,
                request_id,
                event.token_id,
                event.text,
                index,
                event.finish_reason,
                started,
                ttft_s,
                slo_class,
                tpot_s,
                judged,
            )
            if event.finish_reason is not None:
                finished = True
                _record(engine._metrics, done, ttft_s, tpot_s, started, event.finish_reason)
            yield out
            if finished:
                return
    except (RequestRejectedError, InvalidRequestError):
        # Not failures of the service: a rejection is counted where it is decided, and a
        # bad request (a duplicate id) is the client's.
        raise
    except RequestTimeoutError:
        _count_finished(engine._metrics, done.slo_class if done else slo_class, "timeout")
        raise
    except Exception:
        # A worker died, the scheduler is restarting, ...: the client sees 500/503.
        _count_finished(engine._metrics, done.slo_class if done else slo_class, "error")
        raise
    except (GeneratorExit, asyncio.CancelledError):
        if not finished:  # the consumer went away (client disconnect, aclose)
            _count_finished(engine._metrics, done.slo_class if done else slo_class, "abort")
        raise
    finally:
        engine._in_flight.discard(request_id)
        if not finished:
            # The consumer went away (or an error is propagating): free what it held.
            await asyncio.shield(engine._cancel_quietly(request_id))
        engine._in_decode.pop(request_id, None)


async def _decode_events(decode_worker, request_id: str) -> AsyncIterator[TokenEvent]:
    try:
        async for ref in decode_worker.stream.remote(request_id):
            for event in await ref:
                yield event
    except RayActorError as error:
        raise RequestFailedError(
            f"decode worker failed while serving {request_id}: {error}"
        ) from error


def _output(
    done: PrefillDone | None,
    request_id,
    token_id,
    text,
    index,
    finish,
    started,
    ttft_s,
    slo_class,
    tpot_s=None,
    judged: tuple[bool, dict[str, float]] | None = None,
) -> TokenOutput:
    """``judged``: (slo met, hop stamps), fixed when the first token arrived."""
    met, hops = judged if judged is not None else (None, None)
    return TokenOutput(
        request_id,
        token_id,
        text,
        index,
        finish,
        ttft_s if ttft_s is not None else time.monotonic() - started,
        tpot_s,
        done.queue_s if done else 0.0,
        done.preemptions if done else 0,
        done.slo_class if done else slo_class,
        done.ttft_slo_s if done else 0.0,
        done.requested_slo_class if done else None,
        met,
        hops,
    )


def _judge_slo(engine: FlowPrefillEngine, done: PrefillDone, ttft_s: float) -> bool:
    """Whether the request met its TTFT SLO, on the one TTFT clock (request_clock.py): counted
    in the SLO counters here, and returned for ``TokenOutput.slo_met`` (what the API reports)."""
    met = ttft_s <= done.ttft_slo_s
    engine._metrics.inc(
        "flowprefill_slo_met_total" if met else "flowprefill_slo_missed_total",
        slo_class=done.slo_class,
    )
    if not met:
        # The timeline needs this clock too, to tell the serving path's share of a miss from
        # the scheduler's (not awaited; misses only).
        engine._scheduler.note_client_ttft.remote(done.request_id, ttft_s)
    return met


def _record(
    metrics: RuntimeMetrics,
    done: PrefillDone,
    ttft_s: float,
    tpot_s: float | None,
    started: float,
    reason: str,
) -> None:
    cls = done.slo_class
    metrics.observe("flowprefill_time_to_first_token_seconds", ttft_s, slo_class=cls)
    if tpot_s is not None:
        metrics.observe("flowprefill_time_per_output_token_seconds", tpot_s, slo_class=cls)
    metrics.observe(
        "flowprefill_e2e_request_latency_seconds", time.monotonic() - started, slo_class=cls
    )
    _count_finished(metrics, cls, reason)


def _count_finished(metrics: RuntimeMetrics, slo_class: str, reason: str) -> None:
    metrics.inc("flowprefill_requests_finished_total", slo_class=slo_class, finish_reason=reason)
