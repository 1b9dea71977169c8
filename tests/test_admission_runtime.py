"""Admission control and the paused-prefill memory budget, on the real runtime.

The policy decides (tests/test_admission.py covers its logic without Ray); these tests check
that the scheduler actor carries the decisions out: a downgraded request is served under the
looser class and the client is told which class it asked for; a paused prefill evicted to stay
within the budget is recomputed and still completes, and nothing stays held.

One engine (one prefill worker, so preemptions are certain) with SLO classes made for the
test: ``tight`` cannot be met by any prompt, ``urgent`` / ``mid`` / ``loose`` are met alone.
A second one admits everything and gives up on a request the moment it is late
(``late_give_up_factor: 0``): the refusal reaches its caller, and the others are served.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest_ray import runtime_test_config, started_engine
from waiting import async_wait_until

from flowprefill_ray.errors import RequestRejectedError
from flowprefill_ray.runtime.config import RuntimeConfig
from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray

CLASSES = [
    {"name": "tight", "ttft_slo_s": 0.002, "tpot_slo_s": 1.0},
    {"name": "urgent", "ttft_slo_s": 20.0, "tpot_slo_s": 1.0},
    {"name": "mid", "ttft_slo_s": 60.0, "tpot_slo_s": 1.0},
    {"name": "loose", "ttft_slo_s": 120.0, "tpot_slo_s": 1.0},
]
LONG_TOKENS = 3000
# Room for one paused long prompt, not two: the second preemption must evict the first. The
# tiny model keeps ~3.2 KB per paused token (2048 of KV, ~1.2 K of activations): one paused
# 3000-token prompt takes ~9.6 MB, two ~19 MB, and 0.2 x 64 MiB is ~13.4 MB.
KV_MEMORY = {"cpu_budget_bytes": 64 * 2**20, "paused_kv_fraction": 0.2}
SAMPLING = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def admission_engine(ray_local, runtime_cache_dir):
    config = runtime_test_config_with(
        runtime_cache_dir,
        "flowprefill",
        name_prefix="fp-admission",
        slo={"classes": CLASSES, "default_class": "loose"},
        prefill={"kv_memory": KV_MEMORY},
        policy_knobs={"admission": {"action": "downgrade", "estimate": "alone"}},
    )
    with started_engine(config) as engine:
        yield engine


def runtime_test_config_with(cache_dir, policy, policy_knobs, **overrides):
    config = runtime_test_config(cache_dir, policy, **overrides).model_dump()
    config["policy"].update(policy_knobs)
    return RuntimeConfig.model_validate(config)


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 400 + 20 for i in range(length)]


def test_a_request_that_cannot_meet_its_class_is_served_under_a_looser_one(admission_engine):
    engine = admission_engine

    async def scenario():
        before = (await engine.stats())["scheduler"]["counts"].get("downgraded", 0)
        outs = await engine.generate(prompt(1, 200), SAMPLING, slo="tight")
        # An explicit target has no looser class to go to: refused, with a reason.
        with pytest.raises(RequestRejectedError, match="predicted"):
            await engine.generate(prompt(2, 200), SAMPLING, slo=0.001)
        after = (await engine.stats())["scheduler"]["counts"]["downgraded"]
        return outs, after - before

    outs, downgraded = asyncio.run(scenario())
    final = outs[-1]
    assert final.finish_reason == "length" and final.index == SAMPLING.max_tokens - 1
    # The tightest looser class it can make: "urgent", not "mid" or "loose".
    assert (final.slo_class, final.downgraded_from) == ("urgent", "tight")
    assert final.ttft_slo_s == pytest.approx(20.0)
    assert downgraded == 1
    # A request that can make its own class is not touched.
    plain = asyncio.run(engine.generate(prompt(3, 50), SAMPLING, slo="mid"))[-1]
    assert (plain.slo_class, plain.downgraded_from) == ("mid", None)


def test_paused_prefills_stay_within_the_budget_by_evicting_and_recomputing(admission_engine):
    """A (loose) runs and is preempted by B (mid); B is preempted by C (urgent). Keeping both
    A and B paused would hold ~19 MB, over the ~13 MB paused budget: A is evicted (its
    paused state dropped), and recomputed from its first token later. All three complete."""
    engine = admission_engine

    async def scenario():
        async def stats():
            return (await engine.stats())["scheduler"]

        first = await stats()
        evictions_before = first["policy"]["evictions"]

        async def run(ids, slo):
            return await engine.generate(ids, SAMPLING, slo=slo)

        a = asyncio.create_task(run(prompt(10, LONG_TOKENS), "loose"))
        await async_wait_until(
            lambda: _has(stats, lambda s: any(s["running_units"].values())), 60, "A to run"
        )
        b = asyncio.create_task(run(prompt(11, LONG_TOKENS), "mid"))
        await async_wait_until(
            lambda: _has(stats, lambda s: sum(map(len, s["paused_units"].values())) == 1),
            60,
            "A to be paused for B",
        )
        c = asyncio.create_task(run(prompt(12, 64), "urgent"))
        results = await asyncio.wait_for(asyncio.gather(a, b, c), 180)
        return evictions_before, results, await engine.stats()

    evictions_before, results, stats = asyncio.run(scenario())
    for outs in results:
        assert outs[-1].finish_reason == "length" and outs[-1].index == SAMPLING.max_tokens - 1
    policy = stats["scheduler"]["policy"]
    assert policy["evictions"] == evictions_before + 1, policy
    assert policy["preemptions"] >= 2, policy
    # A restarted from token 0 and still completed; nothing is held afterwards.
    worker = stats["prefill_workers"]["prefill-0"]
    assert worker["paused_units"] == 0 and worker["paused_bytes"] == 0
    assert worker["held_kv_bytes"] == 0 and worker["held_bytes"] == 0
    assert stats["disagreements"] == []
    assert stats["decode_workers"]["decode-0"]["used_blocks"] == 0


async def _has(stats, check):
    return check(await stats())


@pytest.fixture(scope="module")
def give_up_engine(ray_local, runtime_cache_dir):
    config = runtime_test_config_with(
        runtime_cache_dir,
        "flowprefill",
        name_prefix="fp-give-up",
        slo={"classes": CLASSES, "default_class": "loose"},
        policy_knobs={"admission": {"action": "admit"}, "late_give_up_factor": 0.0},
    )
    with started_engine(config) as engine:
        yield engine


def test_a_request_given_up_while_waiting_is_refused_and_nobody_else_is_hurt(give_up_engine):
    """A long loose prompt runs; a short one with a 1 ms target arrives behind it, late at
    once (so it preempts nothing) and admitted anyway. At the next event (the long one's
    completion) the policy gives up on it before scheduling: its caller gets the refusal,
    the long one completes, and a later request is served."""
    engine = give_up_engine

    async def scenario():
        async def stats():
            return (await engine.stats())["scheduler"]

        given_up_before = (await stats())["policy"]["given_up"]
        long = asyncio.create_task(engine.generate(prompt(20, LONG_TOKENS), SAMPLING, slo="loose"))
        await async_wait_until(
            lambda: _has(stats, lambda s: any(s["running_units"].values())), 60, "the long one"
        )
        with pytest.raises(RequestRejectedError, match="gave up after") as refused:
            await asyncio.wait_for(engine.generate(prompt(21, 64), SAMPLING, slo=0.001), 120)
        long_outs = await asyncio.wait_for(long, 120)
        later = await engine.generate(prompt(22, 32), SAMPLING, slo="urgent")
        return given_up_before, refused.value, long_outs, later, await engine.stats()

    given_up_before, refused, long_outs, later, stats = asyncio.run(scenario())
    assert refused.retry_after_s == 1.0
    for outs in (long_outs, later):
        assert outs[-1].finish_reason == "length" and outs[-1].index == SAMPLING.max_tokens - 1
    assert stats["scheduler"]["policy"]["given_up"] == given_up_before + 1
    worker = stats["prefill_workers"]["prefill-0"]
    assert worker["paused_units"] == 0 and worker["held_bytes"] == 0
    assert stats["disagreements"] == []
