"""The simulator's prediction for exactly what a live replay sent.

A live trial's plan (arrival offsets, prompt lengths after scaling, SLO classes, TTFT targets)
becomes a ``Workload`` and runs through ``flowprefill_ray.simulator.experiment.simulate`` with
the same policy config. The default cost model is the measured profile of the tiny model on
this machine's CPU (``simulator/profiles/tiny_cpu.json``), so the comparison is meaningful for
live runs of the tiny model; the simulator leaves out HTTP, Ray and decode, which is what the
comparison measures.
"""

from __future__ import annotations

from typing import Any

from flowprefill_ray.scheduling import PolicyConfig
from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.simulator.engine import SimulatorConfig
from flowprefill_ray.simulator.experiment import simulate
from flowprefill_ray.simulator.measured import MeasuredCostModel
from flowprefill_ray.simulator.results import SimulationResult
from flowprefill_ray.workloads import TraceRecord, Workload

from .config import ReplayConfig
from .plan import PlannedRequest, load_trace_workload, plan_requests, ttft_targets


def plan_workload(plan: list[PlannedRequest], name: str = "live-plan") -> Workload:
    """The plan as a trace: send offsets become arrivals, scaled lengths stay as sent."""
    return Workload(
        name,
        tuple(
            TraceRecord(p.send_at_s, p.prompt_tokens, p.max_output_tokens, p.slo_class)
            for p in plan
        ),
    )


def simulate_plan(
    plan: list[PlannedRequest],
    policy: dict[str, Any],
    slo: SLOConfig,
    cost_model: Any = None,
    num_workers: int = 1,
) -> SimulationResult:
    """Simulate ``plan`` under ``policy`` (a ``PolicyConfig`` dict) with ``num_workers``
    prefill workers; TTFT targets come from ``slo`` as in the live run."""
    return simulate(
        plan_workload(plan),
        PolicyConfig.model_validate(policy),
        cost_model or MeasuredCostModel(),
        slo,
        SimulatorConfig(num_workers=num_workers),
    )


def simulate_trials(
    points: list[dict[str, Any]],
    replay: ReplayConfig,
    slo: SLOConfig,
    policy: dict[str, Any],
    cost_model: Any = None,
    num_workers: int = 1,
) -> None:
    """Add ``simulated_attainment`` (0..1) and ``simulated_by_class`` to each live trial point
    (dicts with ``rate_scale``), re-planning the very requests that trial sent."""
    workload = load_trace_workload(replay.trace)
    for point in points:
        trial = replay.model_copy(update={"rate_scale": point["rate_scale"]})
        plan = [
            p
            for p in plan_requests(workload, trial, ttft_targets(slo))
            if p.send_at_s < trial.duration_s
        ]
        result = simulate_plan(plan, policy, slo, cost_model, num_workers)
        point["simulated_attainment"] = result.attainment
        point["simulated_by_class"] = result.attainment_by_class()
        point["simulated_preemptions"] = result.preemptions
