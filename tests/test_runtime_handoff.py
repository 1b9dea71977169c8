"""Prefill -> decode hand-off on a real local Ray cluster: no stream may stop after its first token.

Regression for a live stall: streams got their first token (from the scheduler) and then
nothing, forever. Cause: the scheduler dropped every completed request's KV on the prefill
worker right after issuing the hand-off (the "cancelled" list was taken after the first tokens
had removed the requests from its table), so a ``drop_request`` that overtook ``take_kv`` on
the threaded prefill actor made the decode worker's KV fetch fail, and the decode worker then
raised out of ``accept`` without ending the request's token queue. Both halves are checked:
a failed KV fetch must end the stream with ``finish_reason="error"`` (deterministic), and a
burst packed into multi-request units must stream every token of every request.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from waiting import async_wait_until

from flowprefill_ray.runtime.messages import Handoff
from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray

# Seconds a stream may take in these tests; a stalled one would wait forever.
STREAM_BOUND_S = 60.0


async def _drain(decode_worker, request_id: str) -> list:
    events = []
    async for ref in decode_worker.stream.remote(request_id):
        events.extend(await ref)
    return events


def test_a_kv_fetch_that_fails_ends_the_stream_with_error_not_silence(runtime_engines):
    engine = runtime_engines("edf")
    decode = engine.decode_workers["decode-0"]
    prefill = engine.prefill_workers["prefill-0"]
    rid = "handoff-kv-gone"
    handoff = Handoff(rid, 42, 5, SamplingParams(max_tokens=4), "text")

    async def scenario():
        # The prefill worker holds no KV for this id (as after a drop that overtook take_kv):
        # its take_kv raises, so the decode worker's fetch fails.
        kv_ref = prefill.take_kv.remote(rid)
        stream = asyncio.create_task(_drain(decode, rid))
        with pytest.raises(Exception, match="no finished KV"):
            await decode.accept.remote(handoff, [kv_ref])
        return await asyncio.wait_for(stream, 20.0)

    events = asyncio.run(scenario())
    assert [e.finish_reason for e in events] == ["error"]
    stats = asyncio.run(engine.stats())["decode_workers"]["decode-0"]
    assert stats["used_blocks"] == 0 and stats["waiting"] == 0


def test_a_burst_packed_into_units_streams_every_token_of_every_request(runtime_engines):
    engine = runtime_engines("edf")  # run to completion: the burst is packed into few units
    sampling = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rng = random.Random(3)
    classes = ["text", "image", "search", "file"]
    lengths = [rng.choice([8, 16, 39, 100, 300]) for _ in range(28)]

    async def one(i: int, length: int):
        prompt = [rng.randrange(1, 500) for _ in range(length)]
        return [out async for out in engine.submit(prompt, sampling, classes[i % 4])]

    async def scenario():
        tasks = [one(i, n) for i, n in enumerate(lengths)]
        return await asyncio.wait_for(asyncio.gather(*tasks), STREAM_BOUND_S)

    results = asyncio.run(scenario())
    for outputs in results:
        assert [o.index for o in outputs] == list(range(8)), outputs[-1]
        assert outputs[-1].finish_reason == "length"
    stats = asyncio.run(engine.stats())
    assert stats["scheduler"]["counts"]["units"] < len(lengths)  # units held several requests
    assert stats["prefill_workers"]["prefill-0"]["held_kv_bytes"] == 0
    decode = stats["decode_workers"]["decode-0"]
    assert decode["used_blocks"] == 0 and decode["reserved_blocks"] == 0


def test_the_scheduler_sees_decode_load_fall_when_requests_finish(runtime_engines):
    """The decode worker is chosen by load; a view that only rises (updated on accept alone)
    would make a worker that once took a burst look busy for ever."""
    engine = runtime_engines("edf")
    sampling = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def scenario():
        async def one(i: int):
            return [out async for out in engine.submit([5 + i, 6, 7, 8], sampling, "text")]

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(6))), STREAM_BOUND_S)
        # The update is fire-and-forget from the decode loop: wait for it to land.
        last: dict = {}

        async def idle():
            last.update((await engine.stats())["scheduler"]["decode_load"]["decode-0"])
            return dict(last) if last["running"] == 0 and last["waiting"] == 0 else None

        return await async_wait_until(
            idle, 5.0, lambda: f"the scheduler to see decode-0 idle (last: {last})", poll_s=0.1
        )

    view = asyncio.run(scenario())
    assert view["running"] == 0 and view["waiting"] == 0, view
