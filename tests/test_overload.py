"""Overload: open-loop arrivals at about 3x the measured capacity, on the real runtime.

Admission control (the policy's ``admission`` reject of requests that cannot make it alone, and
the engine's ``max_in_flight`` bound) must turn the excess into fast 429-style rejections, so that what is admitted is still
served and memory stays flat instead of queues growing without bound. The long version is
benchmarks/soak.py with ``--load 3``.
"""

from __future__ import annotations

import asyncio
import statistics

import pytest
from conftest_ray import runtime_test_config

from flowprefill_ray.reliability.steady_load import (
    LoadClass,
    measure_prefill_s,
    run_steady_load,
)
from flowprefill_ray.runtime.config import RuntimeConfig
from flowprefill_ray.runtime.engine import FlowPrefillEngine

pytestmark = pytest.mark.ray

PROMPT_TOKENS = 512
MAX_IN_FLIGHT = 12
OVERLOAD = 3.0
DURATION_S = 20.0


@pytest.fixture(scope="module")
def overload_engine(ray_local, runtime_cache_dir):
    base = runtime_test_config(
        runtime_cache_dir,
        "flowprefill",
        name_prefix="fp-overload",
        requests={"max_in_flight": MAX_IN_FLIGHT},
    ).model_dump()
    base["policy"].update(admission={"action": "reject", "estimate": "alone", "retry_after_s": 1.0})
    config = RuntimeConfig.model_validate(base)
    engine = asyncio.run(FlowPrefillEngine.start(config))
    yield engine
    asyncio.run(engine.shutdown())


def test_three_times_capacity_is_shed_while_admitted_urgent_requests_keep_their_slo(
    overload_engine,
):
    engine = overload_engine

    async def scenario():
        prefill_s = await measure_prefill_s(engine, PROMPT_TOKENS)
        # Capacity of one prefill worker for these prompts, requests per second (unbatched:
        # a conservative figure, batching only raises it).
        capacity_rps = 1.0 / prefill_s
        classes = [
            # Urgent: room for twice the in-flight bound's worth of queueing ahead of it, no more.
            LoadClass("urgent", PROMPT_TOKENS, 2 * MAX_IN_FLIGHT * prefill_s, 0.5),
            LoadClass("relaxed", PROMPT_TOKENS, 10 * MAX_IN_FLIGHT * prefill_s, 0.5),
        ]
        report = await run_steady_load(
            engine, classes, OVERLOAD * capacity_rps, DURATION_S, max_tokens=2,
            sample_period_s=0.5, request_bound_s=120.0,
        )  # fmt: skip
        return prefill_s, report

    prefill_s, report = asyncio.run(scenario())
    counts = report.counts()
    print("prefill_s", prefill_s, "counts", counts, "attainment", report.to_json()["per_class"])
    # Every request ended exactly once: served, or refused with a retry hint; nothing failed.
    assert counts["sent"] == counts["completed"] + counts["rejected"] + counts["failed"]
    assert counts["failed"] == 0, report.to_json()["errors"]
    # Overload really happened and was shed...
    assert counts["rejected"] >= counts["sent"] * 0.2, counts
    # ...and what was admitted was served in time.
    urgent = report.attainment("urgent")
    assert urgent is not None and urgent >= 0.9, report.to_json()["per_class"]
    # Memory stays flat: the queue never exceeds its bound, nothing is left held at the end,
    # and the actors' resident memory does not trend up from the first half to the second.
    samples = report.samples
    assert max(s.scheduler_in_prefill for s in samples) <= MAX_IN_FLIGHT
    end = samples[-1]
    assert (end.scheduler_in_prefill, end.decode_used_blocks, end.prefill_held_kv_bytes) == (
        0,
        0,
        0,
    )
    assert end.prefill_paused_requests == 0
    half = len(samples) // 2
    first = statistics.median(s.actors_rss_mib for s in samples[1:half])
    second = statistics.median(s.actors_rss_mib for s in samples[half:])
    assert second - first < 64.0, (first, second)
    # Every runtime actor is sampled, by kind, and the kinds add up to the total.
    assert set(end.actors_rss_by_kind_mib) == {"Scheduler", "PrefillWorker", "DecodeWorker"}
    assert abs(sum(end.actors_rss_by_kind_mib.values()) - end.actors_rss_mib) < 0.5
