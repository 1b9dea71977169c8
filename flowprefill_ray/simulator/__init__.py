"""Discrete-event simulator of prefill workers driven by the real scheduling policies, cost
models (measured CPU profile, GPU roofline) and the goodput search. Plain Python: no Ray, no
torch (the profiler that measures our model with torch is ``scripts/profile_model.py``)."""

from .config import SimulatorConfig
from .cost_model import CostModel, Granularity, ItemShape, UnitCost, UnitTimeline, plan_unit
from .engine import PolicyContractError, SimulationStalled, Simulator
from .experiment import fit_predictor, fitted_slo_scale, goodput, prefill_s, simulate
from .goodput import GoodputResult, GoodputSearchConfig, RatePoint, attainment_curve, find_goodput
from .measured import MeasuredCostModel, MeasuredProfile
from .noisy import NoisyCostModel
from .results import RequestOutcome, SimulationResult, WorkerStats
from .roofline import (
    A800_SXM,
    H100_SXM,
    LLAMA_3_1_8B,
    GPUSpec,
    ModelShape,
    RooflineConfig,
    RooflineCostModel,
)

__all__ = [
    "A800_SXM",
    "H100_SXM",
    "LLAMA_3_1_8B",
    "CostModel",
    "GPUSpec",
    "GoodputResult",
    "GoodputSearchConfig",
    "Granularity",
    "ItemShape",
    "MeasuredCostModel",
    "MeasuredProfile",
    "ModelShape",
    "NoisyCostModel",
    "PolicyContractError",
    "RatePoint",
    "RequestOutcome",
    "RooflineConfig",
    "RooflineCostModel",
    "SimulationResult",
    "SimulationStalled",
    "Simulator",
    "SimulatorConfig",
    "UnitCost",
    "UnitTimeline",
    "WorkerStats",
    "attainment_curve",
    "find_goodput",
    "fit_predictor",
    "fitted_slo_scale",
    "goodput",
    "plan_unit",
    "prefill_s",
    "simulate",
]
