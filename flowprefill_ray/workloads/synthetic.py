"""Synthetic workloads: Poisson or Gamma arrivals with configurable length distributions.

Gamma inter-arrival gaps with coefficient of variation ``cv`` model burstiness: cv = 1 is a
Poisson process, cv > 1 is burstier (clusters of arrivals then lulls), cv < 1 is more regular.
With shape k = 1 / cv^2 and scale 1 / (rate * k) the mean gap is 1 / rate for every cv.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .trace import TraceRecord, Workload


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedLength(_Frozen):
    kind: Literal["fixed"] = "fixed"
    tokens: int = Field(gt=0)


class UniformLength(_Frozen):
    """Integers uniform in ``[low, high]`` tokens."""

    kind: Literal["uniform"] = "uniform"
    low: int = Field(gt=0)
    high: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"uniform length needs low <= high, got {self.low} > {self.high}")
        return self


class LogNormalLength(_Frozen):
    """Log-normal with the given median (tokens) and sigma of log-length, clipped to
    ``[min_tokens, max_tokens]``: the long-tailed shape real prompt lengths have."""

    kind: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)
    min_tokens: int = Field(default=1, gt=0)
    max_tokens: int = Field(default=32768, gt=0)


class TraceLength(_Frozen):
    """Lengths resampled (with replacement) from a built-in trace: keeps its real shape,
    including the pairing of prompt and output lengths."""

    kind: Literal["trace"] = "trace"
    trace: str = "azure_2023_conv"


LengthDistribution = Annotated[
    Union[FixedLength, UniformLength, LogNormalLength, TraceLength], Field(discriminator="kind")
]


class SyntheticConfig(_Frozen):
    """A synthetic open-loop workload.

    ``rate_per_s``: mean arrivals per second. ``arrival``: ``poisson`` or ``gamma`` (with
    ``cv``). Length is given either by ``num_requests`` or ``duration_s`` (seconds).
    When ``prompt`` is a ``TraceLength``, output lengths come from the same trace record and
    ``output`` is ignored.
    """

    rate_per_s: float = Field(gt=0)
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = Field(default=1.0, gt=0)
    num_requests: int | None = Field(default=None, gt=0)
    duration_s: float | None = Field(default=None, gt=0)
    prompt: LengthDistribution = LogNormalLength(median=1024, sigma=1.0)
    output: LengthDistribution = LogNormalLength(median=128, sigma=0.8, max_tokens=4096)
    seed: int = 0

    @model_validator(mode="after")
    def _one_length(self) -> SyntheticConfig:
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of num_requests or duration_s")
        if self.arrival == "poisson" and self.cv != 1.0:
            raise ValueError("a Poisson process has cv = 1; use arrival='gamma' for another cv")
        return self


def _sampler(dist: FixedLength | UniformLength | LogNormalLength | TraceLength, rng: random.Random):
    if isinstance(dist, FixedLength):
        return lambda: dist.tokens
    if isinstance(dist, UniformLength):
        return lambda: rng.randint(dist.low, dist.high)
    if isinstance(dist, LogNormalLength):
        mu = math.log(dist.median)
        return lambda: min(
            dist.max_tokens, max(dist.min_tokens, round(rng.lognormvariate(mu, dist.sigma)))
        )
    raise TypeError(f"not a scalar length distribution: {dist!r}")


def synthetic_workload(config: SyntheticConfig) -> Workload:
    """Generate a workload; the same config (seed included) always gives the same requests."""
    rng = random.Random(config.seed)
    shape = 1.0 / config.cv**2
    scale = 1.0 / (config.rate_per_s * shape)

    from .loaders import load_builtin

    pairs = None
    if isinstance(config.prompt, TraceLength):
        pairs = [(r.prompt_tokens, r.output_tokens) for r in load_builtin(config.prompt.trace)]
    else:
        prompt_len = _sampler(config.prompt, rng)
        if isinstance(config.output, TraceLength):
            outs = [r.output_tokens for r in load_builtin(config.output.trace)]

            def output_len() -> int:
                return rng.choice(outs)
        else:
            output_len = _sampler(config.output, rng)

    records: list[TraceRecord] = []
    t = 0.0
    while True:
        if config.num_requests is not None and len(records) >= config.num_requests:
            break
        if config.duration_s is not None and t >= config.duration_s:
            break
        if pairs is not None:
            p, o = rng.choice(pairs)
        else:
            p, o = prompt_len(), output_len()
        records.append(TraceRecord(t, p, o))
        t += (
            rng.gammavariate(shape, scale)
            if config.arrival == "gamma"
            else rng.expovariate(config.rate_per_s)
        )
    kind = config.arrival if config.arrival == "poisson" else f"gamma-cv{config.cv:g}"
    return Workload(f"synthetic-{kind}-{config.rate_per_s:g}rps-seed{config.seed}", tuple(records))
