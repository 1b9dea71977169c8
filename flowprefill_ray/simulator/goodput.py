"""Goodput: the highest load at which enough requests meet their TTFT SLO.

DistServe's definition: goodput is the highest request rate at which at least 90 % of
requests meet their SLOs. Load is expressed as a *rate scale* (trace inter-arrival gaps
divided by it, see ``Workload.scale_rate``); goodput in requests/s is the scale times the
trace's own rate.

The search is generic over ``run_at(scale) -> result``, where the result is a float
attainment or anything with an ``attainment`` attribute (a ``SimulationResult``, a load
generator's report), so the same bisection drives the simulator and a live endpoint.
It brackets by doubling/halving from ``start``, then bisects until the bracket is narrower
than ``rel_tol`` of its lower end. Attainment is assumed to fall as load rises; if a noisy
measurement breaks that, the search still returns a scale that was measured to pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GoodputSearchConfig(BaseModel):
    """``target``: required SLO attainment (fraction); ``start``: first rate scale tried;
    ``rel_tol``: stop when (hi - lo) <= rel_tol * lo; scales outside
    ``[min_scale, max_scale]`` are not tried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: float = Field(default=0.9, gt=0, le=1)
    start: float = Field(default=1.0, gt=0)
    rel_tol: float = Field(default=0.02, gt=0)
    min_scale: float = Field(default=1e-3, gt=0)
    max_scale: float = Field(default=1e4, gt=0)
    max_evaluations: int = Field(default=40, gt=1)

    @model_validator(mode="after")
    def _range(self) -> GoodputSearchConfig:
        if not self.min_scale <= self.start <= self.max_scale:
            raise ValueError(f"start {self.start} is outside [{self.min_scale}, {self.max_scale}]")
        return self


@dataclass(slots=True)
class RatePoint:
    rate_scale: float
    attainment: float
    result: Any = None


@dataclass(slots=True)
class GoodputResult:
    """``rate_scale``: the highest scale measured to meet the target (0 if none did);
    ``failing_scale``: the lowest measured to miss it (None if none did); ``points``: every
    evaluation, ascending by scale (the attainment-vs-rate curve)."""

    rate_scale: float
    failing_scale: float | None
    target: float
    points: list[RatePoint] = field(default_factory=list)

    @property
    def passing_result(self) -> Any:
        """The result measured at ``rate_scale`` (None when nothing passed)."""
        for p in self.points:
            if p.rate_scale == self.rate_scale:
                return p.result
        return None


def _attainment_of(result: Any) -> float:
    if isinstance(result, (int, float)):
        return float(result)
    value = getattr(result, "attainment", None)
    if value is None:
        raise TypeError(
            f"run_at returned {type(result).__name__}: need a float or an object with .attainment"
        )
    return float(value)


def find_goodput(
    run_at: Callable[[float], Any],
    config: GoodputSearchConfig | None = None,
    measure: Callable[[Any], float] | None = None,
) -> GoodputResult:
    """Bracket then bisect the rate scale at which attainment crosses ``config.target``.

    ``measure(result)`` turns a result into the attainment compared with the target
    (default: the float itself or its ``attainment``; e.g. the worst class's attainment for
    a stricter criterion)."""
    cfg = config or GoodputSearchConfig()
    measure = measure or _attainment_of
    points: dict[float, RatePoint] = {}

    def passes(scale: float) -> bool:
        if scale not in points:
            if len(points) >= cfg.max_evaluations:
                raise RuntimeError(f"goodput search used all {cfg.max_evaluations} evaluations")
            result = run_at(scale)
            points[scale] = RatePoint(scale, measure(result), result)
        return points[scale].attainment >= cfg.target

    lo: float | None = None
    hi: float | None = None
    scale = cfg.start
    if passes(scale):
        lo = scale
        while hi is None:
            scale = min(scale * 2, cfg.max_scale)
            if scale == lo:
                break  # passes even at max_scale
            if passes(scale):
                lo = scale
            else:
                hi = scale
    else:
        hi = scale
        while lo is None:
            scale = max(scale / 2, cfg.min_scale)
            if scale == hi:
                break  # fails even at min_scale
            if passes(scale):
                lo = scale
            else:
                hi = scale

    if lo is not None and hi is not None:
        while hi - lo > cfg.rel_tol * lo:
            mid = (lo + hi) / 2
            if passes(mid):
                lo = mid
            else:
                hi = mid
    ordered = [points[s] for s in sorted(points)]
    return GoodputResult(lo if lo is not None else 0.0, hi, cfg.target, ordered)


def attainment_curve(run_at: Callable[[float], Any], scales: list[float]) -> list[RatePoint]:
    """Attainment at each given rate scale (for plots of attainment vs load)."""
    out = []
    for s in scales:
        result = run_at(s)
        out.append(RatePoint(s, _attainment_of(result), result))
    return out
