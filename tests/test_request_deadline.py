"""Every request has a wall-clock bound: past it, it fails with a clear error and holds nothing.

A dead worker fails its calls at once (tests/test_faults.py); this bound is what ends a request
whose worker is alive but slow or stuck. Real local Ray cluster, tiny model.
"""

from __future__ import annotations

import asyncio

import pytest

from flowprefill_ray.errors import InvalidRequestError, RequestTimeoutError
from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray


def test_a_request_past_its_bound_fails_with_a_timeout_and_releases_everything(runtime_engines):
    engine = runtime_engines("flowprefill")
    # 600 decode steps cannot finish in 0.3 s, so the bound ends the request mid-decode.
    sampling = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)

    async def scenario():
        received = []
        with pytest.raises(RequestTimeoutError, match="did not finish within 0.3 s"):
            async for out in engine.submit(
                list(range(1, 65)), sampling, "text", request_id="bounded-1", timeout_s=0.3
            ):
                received.append(out)
        # A request after it is served normally.
        after = [out async for out in engine.submit([3, 4, 5], SamplingParams(max_tokens=2))]
        return received, after, await engine.stats()

    received, after, stats = asyncio.run(scenario())
    assert len(received) < 600
    assert after[-1].finish_reason is not None
    assert stats["scheduler"]["in_prefill"] == 0
    assert stats["prefill_workers"]["prefill-0"]["held_kv_bytes"] == 0
    decode = stats["decode_workers"]["decode-0"]
    assert decode["used_blocks"] == 0 and decode["reserved_blocks"] == 0


def test_a_bound_that_is_not_positive_is_refused(runtime_engines):
    engine = runtime_engines("flowprefill")
    with pytest.raises(InvalidRequestError, match="timeout_s must be positive"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=1), timeout_s=0)
