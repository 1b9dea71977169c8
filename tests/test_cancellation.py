"""A client that goes away releases everything it held, at whatever stage it was.

tests/test_runtime_engine.py covers a cancel while the prefill runs, during decode, and an
abandoned stream; tests/test_serve_app.py the HTTP disconnects. Here: a request cancelled while
its prefill is *paused* (preempted by an urgent one), and clients that give up at random moments
across every stage (queued, prefill running or paused, KV hand-off, decode). Afterwards the KV
memory is counted on every worker: decode blocks, prefill KV bytes, paused units, and the
scheduler's requests all back to zero.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from waiting import async_wait_until

from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(20, 420) for _ in range(length)]


async def _held(engine) -> dict:
    stats = await engine.stats()
    prefill = stats["prefill_workers"]["prefill-0"]
    decode = stats["decode_workers"]["decode-0"]
    return {
        "scheduler_in_prefill": stats["scheduler"]["in_prefill"],
        "prefill_running_unit": prefill["running_unit"],
        "prefill_paused_units": prefill["paused_units"],
        "prefill_held_kv_bytes": prefill["held_kv_bytes"],
        # Paused activations too, and whether scheduler and worker agree (reconcile.py).
        "prefill_held_bytes": prefill["held_bytes"],
        "disagreements": stats["disagreements"],
        "decode_used_blocks": decode["used_blocks"],
        "decode_running": decode["running"],
        "decode_waiting": decode["waiting"],
    }


_NOTHING_HELD = {
    "scheduler_in_prefill": 0,
    "prefill_running_unit": None,
    "prefill_paused_units": 0,
    "prefill_held_kv_bytes": 0,
    "prefill_held_bytes": 0,
    "disagreements": [],
    "decode_used_blocks": 0,
    "decode_running": 0,
    "decode_waiting": 0,
}


async def _settled(engine, timeout_s: float = 30.0) -> dict:
    """What the workers hold once in-flight units have stopped (a running unit finishes its
    current work before a cancel takes effect)."""
    last: dict = {}

    async def nothing_held():
        last.update(await _held(engine))
        return last == _NOTHING_HELD

    await async_wait_until(
        nothing_held,
        timeout_s,
        lambda: f"the workers to hold nothing (last seen: {last})",
        poll_s=0.05,
    )
    return dict(last)


def test_cancel_while_paused_frees_the_paused_prefill_state(runtime_engines):
    engine = runtime_engines("flowprefill")
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def run():
        before = await _settled(engine)
        long = await engine.submit(_prompt(4000, 1), greedy, 600.0, "paused-then-cancelled")
        long_task = asyncio.create_task(_drain(long))

        # Wait until the long prefill runs, then send urgent work that preempts it.
        async def long_running():
            return (await _held(engine))["prefill_running_unit"] is not None

        await async_wait_until(long_running, 30, "the long prefill to start")
        # Tight targets make the policy pause the long prefill; long enough prompts (a few
        # hundred ms each) keep it paused while the test looks.
        urgent = [
            asyncio.create_task(engine.generate(_prompt(1000, 10 + i), greedy, 0.5))
            for i in range(3)
        ]
        paused_seen = False
        while not paused_seen and not all(u.done() for u in urgent):
            paused_seen = (await _held(engine))["prefill_paused_units"] > 0
        assert await engine.cancel("paused-then-cancelled")
        outs = await long_task
        await asyncio.gather(*urgent)
        return before, paused_seen, outs, await _settled(engine)

    before, paused_seen, outs, after = asyncio.run(run())
    assert before == _NOTHING_HELD
    assert paused_seen, "the urgent requests did not pause the long prefill"
    assert outs[-1].finish_reason == "abort"
    assert after == _NOTHING_HELD


def test_clients_giving_up_at_random_moments_leave_no_kv_behind(runtime_engines):
    engine = runtime_engines("flowprefill")
    rng = random.Random(7)
    sampling = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    outcomes: list[str] = []

    async def client(i: int, give_up_after_s: float) -> None:
        stream = await engine.submit(_prompt(rng.choice([64, 400, 1500]), 100 + i), sampling, 60.0)

        async def consume():
            async for out in stream:
                if out.finish_reason is not None:
                    outcomes.append(out.finish_reason)

        try:
            await asyncio.wait_for(consume(), give_up_after_s)
        except TimeoutError:
            outcomes.append("gave up")  # wait_for cancelled the consumer: the disconnect

    async def run():
        delays = [rng.uniform(0.0, 1.5) for _ in range(16)]
        await asyncio.gather(*(client(i, d) for i, d in enumerate(delays)))
        return await _settled(engine)

    after = asyncio.run(run())
    assert len(outcomes) == 16
    assert outcomes.count("gave up") >= 4, outcomes  # the stages were really interrupted
    assert after == _NOTHING_HELD


async def _drain(stream):
    return [out async for out in stream]
