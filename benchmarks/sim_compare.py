"""The simulator's prediction for exactly what a live replay sent.

A live trial's plan (arrival offsets, prompt lengths after scaling, SLO classes, TTFT targets)
becomes a ``Workload`` and runs through ``flowprefill_ray.simulator.experiment.simulate`` with
the same policy config. The default cost model is the measured profile of the tiny model on
this machine's CPU (``simulator/profiles/tiny_cpu.json``); pass the profile of the model the
live run served (``measured.profile_path``: the tiny model or the embedded SmolLM2), or the
comparison prices a different model. The simulator leaves out HTTP, Ray and decode, which is
what the comparison measures.

Only the live benchmark (``live_policies.py``, beside this file) asks for this comparison, so
it lives with it rather than in ``loadgen``: the load generator itself needs no simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowprefill_ray.scheduling import PolicyConfig
from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.simulator.engine import SimulatorConfig
from flowprefill_ray.simulator.experiment import simulate
from flowprefill_ray.simulator.measured import MeasuredCostModel
from flowprefill_ray.simulator.results import SimulationResult
from flowprefill_ray.workloads import TraceRecord, Workload
from loadgen.config import ReplayConfig
from loadgen.plan import PlannedRequest, load_trace_workload, plan_requests, ttft_targets


def plan_workload(plan: list[PlannedRequest], name: str = "live-plan") -> Workload:
    """The plan as a trace: send offsets become arrivals, scaled lengths stay as sent (hash-id
    blocks too, for a prefix-sharing trace)."""
    return Workload(
        name,
        tuple(
            TraceRecord(p.send_at_s, p.prompt_tokens, p.max_output_tokens, p.slo_class, p.hash_ids)
            for p in plan
        ),
        block_tokens=next((p.block_tokens for p in plan if p.block_tokens), None),
    )


def simulate_plan(
    plan: list[PlannedRequest],
    policy: dict[str, Any],
    slo: SLOConfig,
    cost_model: Any = None,
    num_workers: int = 1,
    calibration: RuntimeCalibration | None = None,
) -> SimulationResult:
    """Simulate ``plan`` under ``policy`` (a ``PolicyConfig`` dict) with ``num_workers``
    prefill workers; TTFT targets come from ``slo`` as in the live run. With ``calibration``
    the cost model runs at the live speed and the runtime's overheads are added."""
    cost_model = cost_model or MeasuredCostModel()
    config = SimulatorConfig(num_workers=num_workers)
    if calibration is not None:
        cost_model = calibration.cost_model(cost_model)
        config = calibration.simulator_config(num_workers)
    return simulate(
        plan_workload(plan), PolicyConfig.model_validate(policy), cost_model, slo, config
    )


def simulate_trials(
    points: list[dict[str, Any]],
    replay: ReplayConfig,
    slo: SLOConfig,
    policy: dict[str, Any],
    cost_model: Any = None,
    num_workers: int = 1,
    prefix: str = "simulated",
    calibration: RuntimeCalibration | None = None,
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
        result = simulate_plan(plan, policy, slo, cost_model, num_workers, calibration)
        point[f"{prefix}_attainment"] = result.attainment
        point[f"{prefix}_by_class"] = result.attainment_by_class()
        point[f"{prefix}_preemptions"] = result.preemptions


def simulated_goodput(
    replay: ReplayConfig,
    slo: SLOConfig,
    policy: dict[str, Any],
    calibration: RuntimeCalibration | None = None,
    rel_tol: float = 0.05,
    cost_model: Any = None,
) -> float:
    """The simulator's goodput (rate scale) for the slice a live search replays: the same
    bisection as ``live_goodput_search`` (>= 90 % attainment), finer, on the planned requests
    of each scale, with ``cost_model`` (default: the tiny model's committed profile) and
    ``calibration`` if given."""
    from flowprefill_ray.simulator.goodput import GoodputSearchConfig, find_goodput

    workload = load_trace_workload(replay.trace)

    def at(scale: float) -> SimulationResult:
        trial = replay.model_copy(update={"rate_scale": scale})
        plan = [
            p
            for p in plan_requests(workload, trial, ttft_targets(slo))
            if p.send_at_s < trial.duration_s
        ]
        return simulate_plan(plan, policy, slo, cost_model, calibration=calibration)

    search = GoodputSearchConfig(
        start=1.0, rel_tol=rel_tol, max_evaluations=40, min_scale=0.01, max_scale=256
    )
    return find_goodput(at, search).rate_scale


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


@dataclass(frozen=True)
class RuntimeCalibration:
    """What the live system adds to the simulator's model, measured from a live run.

    ``speed``: live compute time over the profile's (1 on a quiet machine, more when other
    processes share the cores). ``unit_overhead_s``: per unit, the server's time beyond compute
    (the scheduler's call to the worker and the reply; the worker idles for it between units).
    ``response_overhead_s``: the client's TTFT minus the server's (HTTP, the Serve proxy and
    replica, the engine's stream). ``requests``: how many requests the fit used."""

    speed: float
    unit_overhead_s: float
    response_overhead_s: float
    requests: int

    def cost_model(self, base: Any) -> Any:
        return base if self.speed == 1.0 else ScaledCostModel(base, self.speed)

    def simulator_config(self, num_workers: int = 1) -> SimulatorConfig:
        return SimulatorConfig(
            num_workers=num_workers,
            unit_overhead_s=self.unit_overhead_s,
            response_overhead_s=self.response_overhead_s,
        )

    def describe(self) -> str:
        return (
            f"compute x{self.speed:.2f}, +{self.unit_overhead_s * 1e3:.1f} ms per unit, "
            f"+{self.response_overhead_s * 1e3:.1f} ms per response, from {self.requests} requests"
        )


def calibrate(requests: list[dict[str, Any]], base: Any = None) -> RuntimeCalibration:
    """Fit a ``RuntimeCalibration`` to a live run's requests (dicts of a results.json).

    Over the requests the server never preempted, the server's TTFT minus its queue time (first
    run to first token: compute plus the calls around it) is fitted as
    ``speed * profiled_prefill_s(prompt) + unit_overhead_s`` by least absolute deviations, which
    shrugs off the few requests that shared their unit with others. The response overhead is
    the median of client TTFT minus server TTFT. Fitting both terms matters: on a quiet
    machine the runtime adds ~10 ms per unit whatever the prompt, which a single speed factor
    turns into a 4x slowdown of short prompts and none of long ones.
    """
    from statistics import median

    import numpy as np

    from flowprefill_ray.simulator.experiment import prefill_s

    base = base or MeasuredCostModel()
    x, y, response = [], [], []
    for r in requests:
        server = r.get("server") or {}
        ttft, queue = server.get("ttft_s"), server.get("queue_s")
        if not isinstance(ttft, (int, float)) or not isinstance(queue, (int, float)):
            continue
        if server.get("preemptions", 0) or ttft - queue <= 0:
            continue
        x.append(prefill_s(base, int(r["prompt_tokens"])))
        y.append(ttft - queue)
        if isinstance(r.get("ttft_s"), (int, float)):
            response.append(max(r["ttft_s"] - ttft, 0.0))
    if len(x) < 2:
        raise ValueError("need at least 2 unpreempted requests with server timings to calibrate")
    xs, ys = np.asarray(x), np.asarray(y)
    design = np.stack([xs, np.ones_like(xs)], axis=1)
    weights = np.ones_like(ys)
    for _ in range(100):  # least absolute deviations by iteratively reweighted least squares
        coef, *_ = np.linalg.lstsq(design * weights[:, None], ys * weights, rcond=None)
        weights = 1.0 / np.sqrt(np.maximum(np.abs(ys - design @ coef), 1e-6))
    speed, overhead = float(coef[0]), float(coef[1])
    if speed <= 0.0:
        raise ValueError(f"live prefill times do not grow with the profile's (slope {speed:.3g})")
    return RuntimeCalibration(
        speed=speed,
        unit_overhead_s=max(overhead, 0.0),
        response_overhead_s=median(response) if response else 0.0,
        requests=len(x),
    )
