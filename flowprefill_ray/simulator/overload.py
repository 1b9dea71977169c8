"""The admission-control overload scenario, shared by benchmarks/admission_overload.py and
tests/test_admission.py so that the benchmark reports exactly what the tests check.

Two prefill workers at 4e-4 s per prompt token (2 layers x 2 blocks x 1e-4 s per token, no
overheads: batching buys nothing, so capacity is exact): prompts uniform in 100..900 tokens
take 0.2 s on average, so the workers serve 10 requests/s. Requests arrive as a Poisson stream
(30/s by default: 3x capacity), classes in turn text / image / search / file.
"""

from __future__ import annotations

from flowprefill_ray.scheduling import (
    AdmissionConfig,
    KVBudget,
    PolicyConfig,
    Request,
    SLOConfig,
    TTFTPredictor,
    make_policy,
)
from flowprefill_ray.workloads import SyntheticConfig, synthetic_workload
from flowprefill_ray.workloads.synthetic import UniformLength

from .engine import Simulator, SimulatorConfig
from .experiment import fresh_copy
from .measured import MeasuredCostModel, MeasuredProfile
from .results import SimulationResult

CLASSES = ("text", "image", "search", "file")
NUM_WORKERS = 2


def linear_cost_model() -> MeasuredCostModel:
    """4e-4 s per prompt token on one worker, nothing else (see the module docstring)."""
    return MeasuredCostModel(
        MeasuredProfile(
            name="linear-4e-4",
            num_layers=2,
            attention=(0.0, 1e-4, 0.0),
            mlp=(0.0, 1e-4),
            overhead=(0.0, 0.0),
            tail=(0.0, 0.0),
        )
    )


def overload_requests(
    num_requests: int, slo: SLOConfig, rate_per_s: float = 30.0, seed: int = 5
) -> list[Request]:
    """``num_requests`` Poisson arrivals at ``rate_per_s`` (per second), 100..900-token prompts,
    classes in turn, targets from ``slo``."""
    workload = synthetic_workload(
        SyntheticConfig(
            rate_per_s=rate_per_s,
            num_requests=num_requests,
            prompt=UniformLength(low=100, high=900),
            seed=seed,
        )
    )
    workload = workload.with_slo_classes([CLASSES[i % 4] for i in range(len(workload))])
    return workload.to_requests(slo)


class WaitingPeak:
    """Forwards events to a policy and records the most requests it ever held WAITING."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.peak = 0

    def on_event(self, event, now):
        out = self.policy.on_event(event, now)
        self.peak = max(self.peak, self.policy.waiting)
        return out


def simulate_admission(
    requests: list[Request],
    cost: MeasuredCostModel,
    predictor: TTFTPredictor,
    slo: SLOConfig,
    admission: AdmissionConfig,
    policy: str = "flowprefill",
    kv_budget: KVBudget | None = None,
) -> tuple[SimulationResult, int]:
    """One run on ``NUM_WORKERS`` workers (each with ``kv_budget``, None = unbounded);
    returns the result and the most requests the policy ever held WAITING."""
    config = PolicyConfig(name=policy, admission=admission)
    probe = WaitingPeak(make_policy(config, fresh_copy(predictor), slo=slo))
    sim_config = SimulatorConfig(num_workers=NUM_WORKERS, kv_budget=kv_budget)
    result = Simulator(probe, cost, sim_config).run(requests)
    return result, probe.peak
