"""Driving a scheduling policy by hand, shared by the policy and admission tests.

The predictor is linear at 2**-10 s per token (1024 tokens take exactly 1 s), so every time in
those tests is an exact binary fraction and bounds are tested exactly.
"""

from __future__ import annotations

from flowprefill_ray.scheduling import (
    KVBudget,
    PolicyConfig,
    Request,
    SLOConfig,
    TTFTPredictor,
    make_policy,
)
from flowprefill_ray.scheduling.events import Arrival, RunUnit, WorkerJoined, WorkItem, WorkUnit

SPT = 2.0**-10  # predicted seconds per prompt token


def linear_predictor() -> TTFTPredictor:
    return TTFTPredictor.linear(SPT, max_tokens=16384)


def policy(
    name: str = "flowprefill",
    workers: int = 1,
    slo: SLOConfig | None = None,
    kv_budget: KVBudget | None = None,
    **config,
):
    """A policy with ``workers`` idle workers ``w0..``, each with ``kv_budget`` (None =
    unbounded), no online correction."""
    p = make_policy(
        PolicyConfig(name=name, online_correction=False, **config), linear_predictor(), slo=slo
    )
    for i in range(workers):
        assert p.on_event(WorkerJoined(f"w{i}", kv_budget), 0.0) == []  # nothing to run yet
    return p


def arrive(p, rid: str, now: float, tokens: int, slo_s: float | None = None, cls: str = "text"):
    """The decisions ``p`` takes when request ``rid`` arrives at ``now``."""
    req = Request(
        request_id=rid, arrival_s=now, prompt_tokens=tokens, slo_class=cls, ttft_slo_s=slo_s
    )
    return p.on_event(Arrival(req), now)


def run(unit_id: int, worker: str, *items: tuple[str, int, int]) -> RunUnit:
    """The ``RunUnit`` decision for items ``(request_id, start, end)``."""
    return RunUnit(WorkUnit(unit_id, worker, tuple(WorkItem(*item) for item in items)))
