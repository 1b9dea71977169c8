"""One simulated experiment: a workload, a policy, a cost model -> results or goodput.

Glue between the parts: the policy's TTFT predictor is fitted from the cost model the way the
paper profiles a real deployment (single prompts at 16..256 tokens and 512..20480 in steps
of 512), requests get their TTFT targets from an ``SLOConfig``, and every run gets a fresh
policy and predictor (both are stateful).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .cost_model import CostModel, ItemShape, plan_unit
from .engine import Simulator, SimulatorConfig
from .goodput import GoodputResult, GoodputSearchConfig, find_goodput
from .results import SimulationResult
from .roofline import A800_SXM, RooflineConfig, RooflineCostModel

if TYPE_CHECKING:
    from flowprefill_ray.scheduling.config import PolicyConfig
    from flowprefill_ray.scheduling.predictor import TTFTPredictor
    from flowprefill_ray.scheduling.slo import SLOConfig
    from flowprefill_ray.workloads import Workload

PROFILE_TOKENS = tuple(range(16, 257, 16)) + tuple(range(512, 20481, 512))


def prefill_s(cost_model: CostModel, tokens: int, max_forward_tokens: int = 8192) -> float:
    """Seconds a worker takes to prefill one ``tokens``-long prompt alone."""
    return plan_unit(cost_model, [ItemShape(tokens)], max_forward_tokens).total_s


def fit_predictor(cost_model: CostModel, max_forward_tokens: int = 8192) -> TTFTPredictor:
    """A ``TTFTPredictor`` fitted to the cost model's single-prompt prefill times."""
    from flowprefill_ray.scheduling.predictor import TTFTPredictor

    return TTFTPredictor.fit(
        [(n, prefill_s(cost_model, n, max_forward_tokens)) for n in PROFILE_TOKENS]
    )


def fresh_copy(predictor: TTFTPredictor) -> TTFTPredictor:
    """The same fit with its online correction reset (one per simulated run)."""
    from flowprefill_ray.scheduling.predictor import TTFTPredictor

    return TTFTPredictor(predictor.coefficients, predictor.max_tokens, predictor.config)


def fitted_slo_scale(cost_model: CostModel, workload: Workload) -> float:
    """SLO scale that makes the paper's targets (set for Llama-3.1-8B on one A800) as tight for
    ``cost_model`` as they were there: the time ``cost_model`` needs to prefill every prompt
    of ``workload`` once, over the time the A800 roofline needs for the same prompts.

    A ratio of total work rather than of one typical prompt: when the two platforms scale
    differently with length (our CPU model's attention dominates sooner), it keeps the share
    of requests that could meet their SLO if run alone close to the A800's."""
    reference = RooflineCostModel(RooflineConfig(gpu=A800_SXM))
    lengths = [r.prompt_tokens for r in workload]
    ours = sum(prefill_s(cost_model, n) for n in lengths)
    return ours / sum(prefill_s(reference, n) for n in lengths)


def simulate(
    workload: Workload,
    policy_config: PolicyConfig,
    cost_model: CostModel,
    slo_config: SLOConfig,
    sim_config: SimulatorConfig | None = None,
    predictor: TTFTPredictor | None = None,
) -> SimulationResult:
    """Run ``policy_config``'s policy over ``workload`` (classes from the records) once."""
    from flowprefill_ray.scheduling import make_policy

    sim_config = sim_config or SimulatorConfig()
    base = predictor or fit_predictor(cost_model, sim_config.max_forward_tokens)
    policy = make_policy(policy_config, fresh_copy(base), slo=slo_config)
    requests = workload.to_requests(slo_config)
    return Simulator(policy, cost_model, sim_config).run(requests)


def goodput(
    workload: Workload,
    policy_config: PolicyConfig,
    cost_model: CostModel,
    slo_config: SLOConfig,
    sim_config: SimulatorConfig | None = None,
    search: GoodputSearchConfig | None = None,
    criterion: Literal["overall", "every_class"] = "overall",
) -> GoodputResult:
    """Highest rate scale of ``workload`` at which the policy meets ``search.target``
    attainment: over all requests (``overall``, DistServe's definition) or in every SLO class
    (``every_class``: a policy may not buy goodput by giving up on one class)."""
    sim_config = sim_config or SimulatorConfig()
    predictor = fit_predictor(cost_model, sim_config.max_forward_tokens)
    return find_goodput(
        lambda scale: simulate(
            workload.scale_rate(scale), policy_config, cost_model, slo_config, sim_config, predictor
        ),
        search,
        measure=(lambda r: r.worst_class_attainment) if criterion == "every_class" else None,
    )
