"""Worker crashes under load, on a real local Ray cluster with the tiny model.

The workers are real actors and are killed for real (SIGKILL of their process, as the kernel's
OOM killer or a node failure would). Every test counts its requests: sent == completed +
failed with a clear error, each request ending exactly once.

One engine (two prefill workers, one decode worker, own actor names) serves the module; the
tests kill its workers, so no other module shares it.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray
from conftest_ray import runtime_test_config, started_engine
from waiting import async_wait_until, wait_until

from flowprefill_ray.errors import EngineUnavailableError, RuntimeEngineError
from flowprefill_ray.runtime.engine import FlowPrefillEngine
from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray

# Long enough that a 1-2k-token prefill is still running when the kill lands, short enough for
# CI. The SLO scale is loose: these tests are about losing nothing, not about attainment.
PROMPT_TOKENS = 1500
SLO_SCALE = 100.0
# Every request of these tests must end within this bound (seconds), or the test fails.
REQUEST_BOUND_S = 120.0


@pytest.fixture(scope="module")
def fault_engine(ray_local, runtime_cache_dir):
    config = runtime_test_config(
        runtime_cache_dir,
        "flowprefill",
        name_prefix="fp-faults",
        placement={"num_prefill_workers": 2},
        slo={"scale": SLO_SCALE},
        faults={"rejoin_timeout_s": 90.0},
    )
    with started_engine(config) as engine:
        yield engine


def prompt(seed: int, length: int = PROMPT_TOKENS) -> list[int]:
    return [(seed * 7919 + i * 104729) % 400 + 20 for i in range(length)]


async def outcome(engine: FlowPrefillEngine, ids: list[int], sampling: SamplingParams, slo: str):
    """``("completed" | "failed", request_id, final TokenOutput or error)`` for one request."""
    stream = engine.submit(ids, sampling, slo=slo)
    last = None
    try:
        async for out in stream:
            last = out
    except RuntimeEngineError as error:
        return "failed", stream.request_id, error
    if last is not None and last.finish_reason in ("stop", "length"):
        return "completed", stream.request_id, last
    return "failed", stream.request_id, last


def worker_pid(handle, timeout_s: float = 90.0) -> int:
    """The worker's process id, waiting while Ray restarts it (calls made meanwhile fail with
    "the actor is restarting")."""
    return wait_until(
        lambda: ray.get(handle.info.remote(), timeout=timeout_s)["pid"],
        timeout_s,
        "the worker to answer (it may be restarting)",
        poll_s=0.2,
        ignore=(ray.exceptions.ActorUnavailableError,),
    )


async def watched(engine, ids, sampling, progress: dict[str, int], slo: str = "file"):
    """``("ended" | "failed" | "lost", request_id, final TokenOutput or error)``, recording
    the index of each request's latest token in ``progress`` as it streams."""
    stream = engine.submit(ids, sampling, slo=slo)
    try:
        async for out in stream:
            progress[stream.request_id] = out.index
            if out.finish_reason is not None:
                return "ended", stream.request_id, out
    except RuntimeEngineError as error:
        return "failed", stream.request_id, error
    return "lost", stream.request_id, None


def test_prefill_worker_killed_mid_prefill_requeues_its_requests_and_comes_back(fault_engine):
    engine = fault_engine
    victim = engine.prefill_workers["prefill-0"]
    old_pid = worker_pid(victim)
    sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    classes = ["file", "search", "text", "image"]

    async def scenario():
        tasks = [
            asyncio.create_task(outcome(engine, prompt(i), sampling, classes[i % 4]))
            for i in range(8)
        ]

        async def victim_busy():
            stats = await engine.stats()
            sched = stats["scheduler"]
            # A unit running there, and more requests queued behind it.
            running = sched["running_units"].get("prefill-0") is not None
            return running and sched["in_prefill"] >= 4 and sched

        before = await async_wait_until(victim_busy, 60, "prefill-0 to run a unit")
        os.kill(old_pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_BOUND_S)
        return before, results

    before, results = asyncio.run(scenario())
    completed = [r for r in results if r[0] == "completed"]
    failed = [r for r in results if r[0] == "failed"]
    ids = [r[1] for r in results]
    assert len(set(ids)) == len(ids) == 8
    assert len(completed) + len(failed) == 8
    # The killed worker's running (and paused) requests went back to the queue and finished on
    # the other worker; only a request whose KV sat on the dead worker waiting for its hand-off
    # may fail, and then with an error event, not silence.
    assert len(failed) <= 1, failed
    for _, _, final in failed:
        assert isinstance(final, RuntimeEngineError) or final.finish_reason == "error"
    for _, _, final in completed:
        assert final.index == sampling.max_tokens - 1  # every token, none twice
        # The deadline is the one set at arrival: same class target after the re-queue.
        assert final.ttft_slo_s == pytest.approx(
            engine.config.slo.resolve(final.slo_class).ttft_slo_s, rel=1e-9
        )
    assert before["in_prefill"] >= 4

    async def rejoined():
        sched = (await engine.stats())["scheduler"]
        return "prefill-0" in sched["prefill_workers"] and sched

    sched = asyncio.run(async_wait_until(rejoined, 90, "prefill-0 to rejoin"))
    assert sched["counts"]["workers_lost"] == 1
    assert sched["counts"]["workers_rejoined"] == 1
    new_pid = worker_pid(victim)
    assert new_pid != old_pid

    # The replacement takes work again: enough concurrent prompts that both workers get some.
    async def after():
        done = await asyncio.wait_for(
            asyncio.gather(
                *(outcome(engine, prompt(100 + i, 600), sampling, "file") for i in range(6))
            ),
            REQUEST_BOUND_S,
        )
        return done, await engine.stats()

    done, stats = asyncio.run(after())
    assert [r[0] for r in done] == ["completed"] * 6
    assert stats["prefill_workers"]["prefill-0"]["units_completed"] >= 1


def test_decode_worker_killed_mid_decode_fails_its_requests_clearly_then_restarts(fault_engine):
    engine = fault_engine
    victim = engine.decode_workers["decode-0"]
    old_pid = worker_pid(victim)
    # Long outputs so the kill lands while every request is decoding.
    sampling = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def scenario():
        progress: dict[str, int] = {}

        tasks = [
            asyncio.create_task(watched(engine, prompt(200 + i, 64), sampling, progress))
            for i in range(4)
        ]

        async def all_decoding():
            return len(progress) == 4 and min(progress.values()) >= 3

        await async_wait_until(all_decoding, 60, "4 requests to be decoding")
        os.kill(old_pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_BOUND_S)

    results = asyncio.run(scenario())
    assert len({r[1] for r in results}) == 4
    # Documented choice (docs/RELIABILITY.md): decode state is not replayed; each stream ends
    # with an error that names the decode worker, none hangs, none is silently cut short.
    for kind, rid, error in results:
        assert kind == "failed", (kind, rid, error)
        assert "decode worker failed" in str(error) and rid in str(error)

    # Ray restarts the decode actor under the same handle (the model reloads); once it answers,
    # new requests are served by it.
    new_pid = worker_pid(victim)

    async def served():
        return await asyncio.wait_for(
            outcome(engine, prompt(300, 64), SamplingParams(max_tokens=4, temperature=0.0), "file"),
            REQUEST_BOUND_S,
        )

    kind, _, final = asyncio.run(served())
    assert kind == "completed", final
    assert new_pid != old_pid
    stats = asyncio.run(engine.stats())
    assert stats["decode_workers"]["decode-0"]["used_blocks"] == 0


def test_scheduler_killed_under_load_restarts_and_fails_only_its_prefills_clearly(fault_engine):
    """The scheduler actor dies (SIGKILL) while requests are decoding and others are in
    prefill. Ray restarts it; the requests it held in prefill fail with a clear 503 (the new
    incarnation has no record of them), the decoding ones finish (their tokens come from the
    decode worker), the workers drop what the dead scheduler left on them, and new requests are
    served. Runs last in this module: the engine keeps working but its counters restart."""
    engine = fault_engine
    sampling_long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    sampling_short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def scenario():
        old = (await engine.stats())["scheduler"]
        progress: dict[str, int] = {}

        decoding = [
            asyncio.create_task(watched(engine, prompt(400 + i, 64), sampling_long, progress))
            for i in range(3)
        ]

        async def all_decoding():
            return len(progress) == 3 and min(progress.values()) >= 2

        await async_wait_until(all_decoding, 60, "3 requests to be decoding")
        in_prefill = [
            asyncio.create_task(watched(engine, prompt(500 + i), sampling_short, progress))
            for i in range(6)
        ]

        async def prefilling():
            sched = (await engine.stats())["scheduler"]
            return sched["in_prefill"] >= 3 and sched

        await async_wait_until(prefilling, 60, "prefills to be queued and running")
        os.kill(old["pid"], signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*decoding, *in_prefill), REQUEST_BOUND_S)
        return old, results, progress

    old, results, progress = asyncio.run(scenario())
    assert len({r[1] for r in results}) == len(results) == 9  # each request ended exactly once
    decode_results, prefill_results = results[:3], results[3:]
    # Decoding requests do not need the scheduler any more: every token arrives.
    for kind, rid, final in decode_results:
        assert kind == "ended" and final.finish_reason == "length", (kind, rid, final)
        assert final.index == 299
    # In-prefill requests either finished before the kill or failed with the clear 503.
    failed = [r for r in prefill_results if r[0] == "failed"]
    assert failed, "the kill landed after every prefill had finished: nothing was tested"
    for kind, rid, outcome_ in prefill_results:
        if kind == "failed":
            assert isinstance(outcome_, EngineUnavailableError), outcome_
            assert outcome_.http_status == 503 and "retry" in str(outcome_)
        else:
            assert kind == "ended" and outcome_.index == 2, (kind, rid, outcome_)

    # Ray brings the scheduler back under the same name; a retried request is served by it.
    async def retried():
        kind, _, final = await outcome(engine, prompt(600), sampling_short, "file")
        if kind == "completed":
            return True
        assert isinstance(final, EngineUnavailableError), final  # a clean 503 meanwhile
        return None

    asyncio.run(async_wait_until(retried, 90, "a retried request to complete", poll_s=0.5))
    stats = asyncio.run(engine.stats())
    sched = stats["scheduler"]
    assert sched["pid"] != old["pid"] and sched["epoch"] != old["epoch"]
    assert sched["counts"]["scheduler_restarts"] == 1
    assert sched["in_prefill"] == 0
    # Nothing the dead scheduler left behind is still held: no unit, no KV.
    for wid, worker in stats["prefill_workers"].items():
        assert worker["paused_units"] == 0 and worker["held_kv_bytes"] == 0, (wid, worker)
        assert worker["running_unit"] is None, (wid, worker)
    for wid, worker in stats["decode_workers"].items():
        assert worker["used_blocks"] == 0, (wid, worker)
