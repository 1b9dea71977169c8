"""Prefix-cache pricing and cache-aware routing in the scheduling policy and the simulator.

Hand-driven policies use the linear predictor of ``policy_helpers`` (1024 tokens = 1 s) and
blocks of 64 tokens, so every cached length and every routing threshold is exact.
"""

from __future__ import annotations

import pytest
from policy_helpers import linear_predictor, policy, run
from pydantic import ValidationError

from flowprefill_ray.scheduling import PolicyConfig, Request, SLOConfig, make_policy
from flowprefill_ray.scheduling.events import Arrival, Preempt, RunUnit, UnitCompleted
from flowprefill_ray.scheduling.prefix_blocks import BlockLRU, prefix_hashes, reusable_tokens
from flowprefill_ray.simulator import Simulator, SimulatorConfig
from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy
from flowprefill_ray.simulator.roofline import H100_SXM, RooflineConfig, RooflineCostModel

BLOCK = 64


def prefix_policy(routing: str, workers: int = 2, **prefix):
    return policy(
        workers=workers,
        prefix={"enabled": True, "block_tokens": BLOCK, "routing": routing, **prefix},
    )


def arrive(p, rid: str, now: float, hashes: tuple[int, ...], tokens: int, slo_s: float):
    req = Request(
        request_id=rid, arrival_s=now, prompt_tokens=tokens, ttft_slo_s=slo_s, prefix_hashes=hashes
    )
    return p.on_event(Arrival(req), now)


def finish(p, decision: RunUnit, now: float) -> list:
    unit = decision.unit
    return p.on_event(UnitCompleted(unit.worker_id, unit.unit_id, unit.tokens / 1024), now)


# ------------------------------------------------------------------ hashes and the LRU


def test_block_hashes_are_chained_exact_and_salted():
    a = list(range(1000, 1000 + 4 * BLOCK + 10))
    b = list(a)
    b[2 * BLOCK + 5] += 1  # differs inside block 2
    ha, hb = prefix_hashes(a, BLOCK), prefix_hashes(b, BLOCK)
    assert len(ha) == 4  # the partial last block is not hashed
    assert ha[:2] == hb[:2] and ha[2] != hb[2] and ha[3] != hb[3]  # chained: all later differ
    assert prefix_hashes(a, BLOCK, salt="tenant-a") != ha
    assert set(prefix_hashes(a, BLOCK, salt="tenant-a")).isdisjoint(ha)
    assert prefix_hashes(a, BLOCK, salt="t") == prefix_hashes(a, BLOCK, salt="t")


def test_block_lru_keeps_leading_runs_and_evicts_least_recent():
    lru = BlockLRU(4)
    lru.insert([1, 2, 3])
    assert lru.cached_blocks([1, 2, 3, 4]) == 3
    assert lru.cached_blocks([2, 3]) == 2 and lru.cached_blocks([9, 1]) == 0
    lru.insert([1])  # 1 is now the most recent
    lru.insert([7, 8])  # over capacity: 2 then nothing else goes (4 blocks kept)
    assert lru.cached_blocks([1]) == 1 and lru.cached_blocks([2]) == 0
    assert len(lru) == 4 and lru.evicted_blocks == 1
    empty = BlockLRU(0)
    empty.insert([1])
    assert empty.cached_blocks([1]) == 0


def test_the_last_prompt_token_is_always_computed():
    assert reusable_tokens(4, BLOCK, 4 * BLOCK) == 4 * BLOCK - 1
    assert reusable_tokens(2, BLOCK, 4 * BLOCK + 3) == 2 * BLOCK
    assert reusable_tokens(0, BLOCK, 10) == 0


def test_routing_config_is_validated():
    with pytest.raises(ValidationError, match="routing"):
        PolicyConfig(prefix={"routing": "round_robin"})
    with pytest.raises(ValidationError, match="block_tokens"):
        PolicyConfig(prefix={"block_tokens": 0})


# ------------------------------------------------------------------ the policy


H = tuple(range(100, 110))  # ten chained blocks


def warm(p, worker_hint: str = "w0") -> None:
    """Run a 6-block prompt on ``worker_hint`` (the first idle worker) to completion."""
    first = arrive(p, "warm", 0.0, H[:6], 6 * BLOCK, slo_s=60.0)
    assert first == [run(1, worker_hint, ("warm", 0, 6 * BLOCK))]
    finish(p, first[0], 0.5)


def test_a_hit_starts_at_the_cached_prefix_on_the_worker_that_holds_it():
    p = prefix_policy("cache_aware")
    warm(p)
    # w0 and w1 are both idle; the usual choice would be w0 anyway, so make w0 look worse:
    # give the request a prompt that shares 4 blocks, and check the item starts at 4 blocks.
    out = arrive(p, "b", 1.0, H[:4] + (900, 901), 6 * BLOCK + 7, slo_s=60.0)
    assert out == [run(2, "w0", ("b", 4 * BLOCK, 6 * BLOCK + 7))]
    assert p.counters["prefix_hit_tokens"] == 4 * BLOCK


def test_cache_aware_prefers_the_idle_worker_with_the_cache():
    p = prefix_policy("cache_aware", workers=3)
    warm(p)
    # Occupy w0's usual rival: w0 stays first in line only if routing looks at caches.
    busy = arrive(p, "long", 1.0, (), 4096, slo_s=60.0)
    assert busy == [run(2, "w0", ("long", 0, 4096))]
    finish(p, busy[0], 2.0)  # w0 again idle; w1, w2 never ran anything
    out = arrive(p, "b", 3.0, H[:6], 6 * BLOCK + 1, slo_s=60.0)
    assert out == [run(3, "w0", ("b", 6 * BLOCK, 6 * BLOCK + 1))]
    # least_loaded and random ignore caches but still start at the chosen worker's prefix
    q = prefix_policy("least_loaded", workers=2)
    warm(q)
    assert arrive(q, "b", 1.0, (555,) + H[1:6], 6 * BLOCK, slo_s=60.0) == [
        run(2, "w0", ("b", 0, 6 * BLOCK))
    ]


@pytest.mark.parametrize(
    ("slo_s", "waits"),
    # 640 tokens: 0.625 s cold on the idle w1; 0.5 s of wait for w0, then 0.25 s there
    [(30.0, True), (0.7, False)],
)
def test_a_request_waits_for_a_busy_workers_cache_while_its_deadline_allows(slo_s, waits):
    p = prefix_policy("cache_aware")
    warm(p)
    big = 10 * BLOCK
    busy = arrive(p, "busy", 1.0, (), 512, slo_s=60.0)
    assert busy == [run(2, "w0", ("busy", 0, 512))]
    out = arrive(p, "b", 1.0, H, big, slo_s=slo_s)
    if waits:
        # Waiting costs it slack it can spare; recomputing 6 blocks would cost capacity.
        assert out == [] and p.counters["prefix_deferrals"] == 1
        assert p.requests["b"].cache_wait_until_s == pytest.approx(1.0 + 30.0 - 0.25)
        # w0 frees up: the request takes its cache (and preempted no one meanwhile).
        assert finish(p, busy[0], 1.5) == [run(3, "w0", ("b", 6 * BLOCK, big))]
    else:
        # Waiting would miss 0.7 s (0.75 s); starting cold on w1 makes it (0.625 s).
        assert out == [run(3, "w1", ("b", 0, big))]


def test_a_request_that_would_miss_after_waiting_starts_at_once():
    p = prefix_policy("cache_aware", affinity_margin_s=0.0)
    warm(p)
    busy = arrive(p, "busy", 1.0, (), 128, slo_s=60.0)
    assert busy == [run(2, "w0", ("busy", 0, 128))]
    # Both miss a 0.2 s target: a request that cannot make it by waiting starts at once.
    assert arrive(p, "b", 1.0, H, 10 * BLOCK, slo_s=0.2) == [run(3, "w1", ("b", 0, 10 * BLOCK))]


def test_cache_only_always_waits_for_the_worker_with_the_longest_prefix():
    p = prefix_policy("cache_only")
    warm(p)
    short = arrive(p, "short", 1.0, (), 2048, slo_s=60.0)
    assert short == [run(2, "w0", ("short", 0, 2048))]
    # Even a request that will miss by waiting goes to w0 only.
    assert arrive(p, "b", 1.0, H, 10 * BLOCK, slo_s=0.7) == []
    assert finish(p, short[0], 3.0) == [run(3, "w0", ("b", 6 * BLOCK, 10 * BLOCK))]


def test_a_cached_long_prompt_is_priced_as_the_short_job_it_is():
    p = prefix_policy("cache_aware", workers=1)
    hashes = tuple(range(500, 500 + 40))  # 40 blocks = 2560 tokens
    first = arrive(p, "a", 0.0, hashes, 40 * BLOCK, slo_s=60.0)
    finish(p, first[0], 2.5)
    hog = arrive(p, "hog", 3.0, (), 8192, slo_s=60.0)  # 8 s on the only worker
    assert hog == [run(2, "w0", ("hog", 0, 8192))]
    # 2560 + 16 tokens, 2560 cached: 16 tokens of compute, 0.1 s target: feasible, so it
    # preempts the hog; priced cold (2.5 s) it would be late already and could not.
    out = arrive(p, "again", 3.5, hashes + (999,), 40 * BLOCK + 16, slo_s=0.1)
    assert p.requests["again"].remaining_tokens == 16
    # It preempts the hog, and its unit, sent along, starts at the cached prefix.
    assert out == [Preempt("w0", 2), run(3, "w0", ("again", 40 * BLOCK, 40 * BLOCK + 16))]
    # Until the hog stops, the worker is busy for the hog's rest plus the unit queued behind
    # it (cache-aware routing weighs this wait): 8 s - 0.5 s run, and 16 tokens.
    assert p.busy_remaining_s(3.5) == {"w0": pytest.approx(7.5 + 16 / 1024)}


# ------------------------------------------------------------------ the simulator


def _shared_prefix_requests(n: int, slo: SLOConfig) -> list[Request]:
    """``n`` requests over 4 conversations: each prompt extends its conversation's last one."""
    out = []
    for i in range(n):
        conv, turn = i % 4, i // 4
        blocks = 8 + 2 * turn
        hashes = tuple(conv * 10_000 + b for b in range(blocks))
        out.append(
            Request(
                request_id=f"r{i}",
                arrival_s=0.05 * i,
                prompt_tokens=blocks * 512 + 100,
                slo_class="file",
                prefix_hashes=hashes,
            ).with_slo(slo)
        )
    return out


@pytest.mark.parametrize("routing", ["cache_aware", "cache_only", "least_loaded", "random"])
def test_simulated_caches_serve_hits_and_every_request_finishes(routing):
    slo = SLOConfig()
    cost = RooflineCostModel(RooflineConfig(gpu=H100_SXM))
    config = PolicyConfig(prefix={"enabled": True, "block_tokens": 512, "routing": routing})
    p = make_policy(config, fresh_copy(fit_predictor(cost)), slo=slo)
    sim = Simulator(
        p, cost, SimulatorConfig(num_workers=2, prefix_cache_blocks=4096, max_events=100_000)
    )
    result = sim.run(_shared_prefix_requests(48, slo))
    assert all(o.finished for o in result.outcomes)
    assert sim.prefix_caches.hit_tokens > 0
    assert sim.prefix_caches.hit_tokens == p.counters["prefix_hit_tokens"]  # view == truth
    assert sim.prefix_caches.recomputed_tokens == 0


def test_a_prefix_gone_from_the_cache_is_recomputed_not_failed():
    # The policy believes in a cache the simulated workers do not have (capacity 0).
    slo = SLOConfig()
    cost = RooflineCostModel(RooflineConfig(gpu=H100_SXM))
    config = PolicyConfig(prefix={"enabled": True, "block_tokens": 512})
    p = make_policy(config, fresh_copy(fit_predictor(cost)), slo=slo)
    sim = Simulator(p, cost, SimulatorConfig(num_workers=2, prefix_cache_blocks=0))
    result = sim.run(_shared_prefix_requests(24, slo))
    assert all(o.finished for o in result.outcomes)
    assert sim.prefix_caches.hit_tokens == 0
    assert sim.prefix_caches.recomputed_tokens == p.counters["prefix_hit_tokens"] > 0


def test_linear_predictor_helper_is_exact():
    # The thresholds above rely on 1024 tokens taking exactly 1 s.
    assert linear_predictor().predict(1024) == 1.0
