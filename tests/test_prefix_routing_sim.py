"""benchmarks/prefix_routing_sim.py: a variant's goodput, its attainment there and its cache
hits all come from the goodput search's own simulations, priced at the workload's SLO scale."""

from __future__ import annotations

import argparse

import pytest
from repo_scripts import load_script

from flowprefill_ray.scheduling import PolicyConfig, SLOConfig, make_policy
from flowprefill_ray.simulator import (
    H100_SXM,
    RooflineConfig,
    RooflineCostModel,
    Simulator,
    SimulatorConfig,
)
from flowprefill_ray.simulator.experiment import fit_predictor
from flowprefill_ray.workloads import MultiTurnConfig, multiturn_workload
from flowprefill_ray.workloads.slo_assignment import assign_slo_classes

load_script("benchmarks/provenance.py")  # the script imports its sibling by name
bench = load_script("benchmarks/prefix_routing_sim.py")

BLOCK = 64
CACHE_TOKENS = 20_000
SLO_SCALE = 0.5  # not the default 1.0: the cache statistics must be priced with it too
ARGS = argparse.Namespace(workers=2)


@pytest.fixture(scope="module")
def chats():
    config = MultiTurnConfig(
        conversations=20,
        turns=4,
        system_prompt_tokens=1024,
        question_tokens=256,
        answer_tokens=256,
        think_time_s=20.0,
        conversation_interval_s=0.5,
        block_tokens=BLOCK,
        seed=0,
    )
    return assign_slo_classes(multiturn_workload(config))


@pytest.fixture
def simulations(monkeypatch):
    """Counts every simulation the benchmark runs (the real simulator, only counted)."""
    calls = []
    real_run = Simulator.run

    def counted(self, requests):
        calls.append(len(requests))
        return real_run(self, requests)

    monkeypatch.setattr(Simulator, "run", counted)
    return calls


def simulate_cached(workload, rate_scale: float, slo: SLOConfig) -> tuple[float, float]:
    """(attainment, share of prompt tokens from cache), one simulation done here by hand."""
    cost = RooflineCostModel(RooflineConfig(gpu=H100_SXM))
    blocks = CACHE_TOKENS // BLOCK
    prefix = {"enabled": True, "routing": "cache_only"}
    config = PolicyConfig(
        prefix={**prefix, "block_tokens": BLOCK, "worker_capacity_blocks": blocks}
    )
    sim = Simulator(
        make_policy(config, fit_predictor(cost), slo=slo),
        cost,
        SimulatorConfig(num_workers=2, prefix_cache_blocks=blocks, prefix_block_tokens=BLOCK),
    )
    requests = workload.scale_rate(rate_scale).to_requests(slo)
    result = sim.run(requests)
    return result.attainment, sim.prefix_caches.hit_tokens / sum(r.prompt_tokens for r in requests)


def test_cache_hits_come_from_the_search_run_at_the_goodput_and_the_workloads_slo(
    chats, simulations
):
    prefix = {"enabled": True, "routing": "cache_only"}
    entry = bench.run_variant(chats, BLOCK, prefix, CACHE_TOKENS, SLO_SCALE, ARGS)

    # One simulation per point of the search, none run again after it.
    assert len(simulations) == len(entry["curve"])
    assert entry["attainment_at_goodput"] >= 0.9
    assert entry["attainment_at_goodput"] == dict(entry["curve"])[entry["goodput_rate_scale"]]

    attainment, hits = simulate_cached(
        chats, entry["goodput_rate_scale"], SLOConfig(scale=SLO_SCALE)
    )
    assert entry["attainment_at_goodput"] == attainment
    assert entry["hit_token_fraction"] == pytest.approx(hits)
    assert 0 < entry["hit_token_fraction"] < 1
    assert entry["recomputed_token_fraction"] >= 0


def test_no_cache_variant_reports_no_cache_statistics(chats, simulations):
    entry = bench.run_variant(chats, BLOCK, None, 0, SLO_SCALE, ARGS)
    assert len(simulations) == len(entry["curve"])
    assert entry["goodput_rps"] == entry["goodput_rate_scale"] * chats.mean_rate_per_s
    assert "hit_token_fraction" not in entry and entry["attainment_at_goodput"] >= 0.9
