"""``FlowPrefillEngine.attach``: a second client of actors another engine started and owns.

Over the session's Ray cluster and its flowprefill engine (tiny model on CPU): the attached
client is served by the owner's one scheduler and decode workers, keeps its own in-flight set,
and its shutdown leaves the actors to their owner.
"""

from __future__ import annotations

import asyncio

import pytest

from flowprefill_ray.errors import EngineUnavailableError
from flowprefill_ray.runtime.engine import FlowPrefillEngine
from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = [(i * 37) % 400 + 20 for i in range(40)]


def test_an_attached_client_shares_the_scheduler_and_leaves_the_actors_running(runtime_engines):
    owner = runtime_engines("flowprefill")

    async def scenario():
        client = await FlowPrefillEngine.attach(owner.attachment())
        before = (await owner.stats())["scheduler"]["counts"].get("submitted", 0)
        stream = await client.submit(PROMPT, GREEDY, slo=600.0)
        first = await stream.__anext__()
        in_flight = (client.in_flight, owner.in_flight)
        rest = [out async for out in stream]
        after = (await owner.stats())["scheduler"]["counts"]["submitted"]
        await client.shutdown()
        with pytest.raises(EngineUnavailableError):
            client.submit(PROMPT, GREEDY)
        by_owner = await owner.generate(PROMPT, GREEDY, 600.0)
        return first, rest, in_flight, after - before, by_owner

    first, rest, in_flight, submitted, by_owner = asyncio.run(scenario())
    # The client's request, in the client's in-flight set only, through the owner's scheduler.
    assert in_flight == (frozenset({first.request_id}), frozenset())
    assert submitted == 1
    tokens = [first.token_id] + [out.token_id for out in rest]
    assert rest[-1].finish_reason == "length" and len(tokens) == GREEDY.max_tokens
    # The owner serves on after the client shut down, and greedy decoding gives the same tokens.
    assert [out.token_id for out in by_owner] == tokens
