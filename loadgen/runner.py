"""The open-loop replay: every request leaves at its scheduled time, whatever the server does.

A closed-loop client (next request after the last answer) slows down when the server does, and
so hides overload; real users do not wait for each other. Here a scheduler coroutine sleeps
until each planned offset and starts the request as its own task, so a slow server only makes
requests overlap more.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from .client import monotonic_clock, new_client, send_streaming
from .config import EndpointConfig, ReplayConfig
from .plan import PlannedRequest
from .progress import make_progress
from .result import RequestResult


@dataclass(frozen=True)
class RunResult:
    """Every planned request's record (``not_sent`` for those past the bounds) and the wall
    time of the run in seconds."""

    records: list[RequestResult]
    wall_s: float
    endpoint: EndpointConfig
    replay: ReplayConfig

    @property
    def sent(self) -> list[RequestResult]:
        return [r for r in self.records if r.status != "not_sent"]


def _new_record(planned: PlannedRequest) -> RequestResult:
    return RequestResult(
        request_id=planned.request_id,
        slo_class=planned.slo_class,
        ttft_slo_s=planned.ttft_slo_s,
        prompt_tokens=planned.prompt_tokens,
        max_output_tokens=planned.max_output_tokens,
        scheduled_s=planned.send_at_s,
    )


async def run_open_loop(
    endpoint: EndpointConfig,
    replay: ReplayConfig,
    plan: list[PlannedRequest],
    progress: bool = True,
    client: httpx.AsyncClient | None = None,
) -> RunResult:
    """Replay ``plan`` against ``endpoint`` open loop, within ``replay``'s bounds.

    At most ``replay.max_requests`` requests are sent, none after ``replay.duration_s`` seconds;
    once the last one is sent, requests still streaming get ``replay.drain_s`` more seconds,
    then are cancelled and recorded as ``unfinished``. The run therefore lasts at most
    ``duration_s + drain_s`` seconds. Raises ``ValueError`` before sending anything when
    ``endpoint.priority`` lacks a class of the plan (its requests could not be sent as asked).
    """
    if endpoint.priority is not None:
        missing = sorted({p.slo_class for p in plan} - set(endpoint.priority))
        if missing:
            raise ValueError(
                f"no priority for SLO classes {missing} of the plan; "
                f"priorities given: {endpoint.priority}"
            )
    records = [_new_record(p) for p in plan]
    to_send = [
        (p, r) for p, r in zip(plan, records, strict=True) if p.send_at_s < replay.duration_s
    ][: replay.max_requests]
    bar = make_progress(len(to_send), f"replay x{replay.rate_scale:g}", enabled=progress)
    own_client = client is None
    client = client or new_client(endpoint)
    start = time.perf_counter()
    clock = monotonic_clock(start)
    tasks: list[asyncio.Task[RequestResult]] = []

    def _finished(task: asyncio.Task[RequestResult]) -> None:
        if not task.cancelled():
            bar.advance(task.result().status == "ok")

    try:
        for planned, record in to_send:
            delay = planned.send_at_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(
                send_streaming(client, endpoint, replay, planned, clock, record)
            )
            task.add_done_callback(_finished)
            tasks.append(task)
        if tasks:
            # Sending is over (last request sent, or the duration reached): requests still
            # streaming get drain_s more, so a stuck stream cannot hold the run open.
            deadline = clock() + replay.drain_s
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - clock()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        # Ctrl-C or an error in the caller: stop every in-flight request before returning.
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        if own_client:
            await client.aclose()
    for _, record in to_send:
        if record.status == "unfinished" and record.end_s is None:
            record.error = record.error or "cancelled at the end of the run"
    return RunResult(records=records, wall_s=clock(), endpoint=endpoint, replay=replay)
