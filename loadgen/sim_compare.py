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
    prefix: str = "simulated",
) -> None:
    """Add ``<prefix>_attainment`` (0..1), ``<prefix>_by_class`` and ``<prefix>_preemptions``
    to each live trial point (dicts with ``rate_scale``), re-planning the very requests that
    trial sent."""
    workload = load_trace_workload(replay.trace)
    for point in points:
        trial = replay.model_copy(update={"rate_scale": point["rate_scale"]})
        plan = [
            p
            for p in plan_requests(workload, trial, ttft_targets(slo))
            if p.send_at_s < trial.duration_s
        ]
        result = simulate_plan(plan, policy, slo, cost_model, num_workers)
        point[f"{prefix}_attainment"] = result.attainment
        point[f"{prefix}_by_class"] = result.attainment_by_class()
        point[f"{prefix}_preemptions"] = result.preemptions


class ScaledCostModel:
    """A cost model whose every block time is ``factor`` times the base model's: the measured
    profile recalibrated to the speed the live workers actually ran at (a shared CPU is slower
    than the quiet one the profile assumes)."""

    def __init__(self, base: Any, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"a cost scale factor must be > 0, got {factor}")
        self.base, self.factor = base, factor
        self.num_layers = base.num_layers
        self.name = f"{base.name}x{factor:.2f}"

    def unit_cost(self, items):
        from flowprefill_ray.simulator.cost_model import UnitCost

        c, f = self.base.unit_cost(items), self.factor
        return UnitCost(
            c.overhead_s * f, c.attention_s * f, c.mlp_s * f, c.num_layers, c.tail_s * f
        )


def calibration_factor(requests: list[dict[str, Any]], base: Any = None) -> tuple[float, int]:
    """Median of live prefill time / the cost model's single-prompt prefill time, over the
    requests the server never preempted; returns (factor, requests used).

    ``requests``: per-request dicts of a results.json (``prompt_tokens`` and the server's
    ``ttft_s``, ``queue_s``, ``preemptions``). The server's TTFT minus its queue time is the
    time from first start to first token: the prefill plus whatever the unit was batched with
    and the hand-off, so the factor also absorbs the runtime's per-request overheads.
    """
    from statistics import median

    from flowprefill_ray.simulator.experiment import prefill_s

    base = base or MeasuredCostModel()
    ratios = []
    for r in requests:
        server = r.get("server") or {}
        ttft, queue = server.get("ttft_s"), server.get("queue_s")
        if not isinstance(ttft, (int, float)) or not isinstance(queue, (int, float)):
            continue
        if server.get("preemptions", 0) or ttft - queue <= 0:
            continue
        ratios.append((ttft - queue) / prefill_s(base, int(r["prompt_tokens"])))
    if not ratios:
        raise ValueError("no unpreempted request with server timings to calibrate from")
    return median(ratios), len(ratios)
