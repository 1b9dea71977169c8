"""A cost model whose units run slower or faster than predicted, by a seeded random factor.

On a real worker a unit's compute is not what the profile says: decode shares the cores, the
OS schedules other threads, caches are cold. The scheduler sees this only as units that
overrun (or underrun) their prediction, which is what "batch overran" in the why-late table
is about. ``NoisyCostModel`` wraps any cost model and multiplies every forward it prices by
``exp(N(mu, sigma))``, drawn from its own seeded RNG, so a simulation shows how a policy copes
with a predictor that is right only on average. Fit the predictor from the *base* model
(``experiment.fit_predictor(base)``): the noise is what the predictor does not know.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

from .cost_model import CostModel, ItemShape, UnitCost


class NoisyCostModel:
    """``base``'s costs times a lognormal factor per forward (median ``exp(mu)``,
    log-standard deviation ``sigma``); deterministic for a given ``seed`` and call order."""

    def __init__(self, base: CostModel, sigma: float, mu: float = 0.0, seed: int = 0) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.base = base
        self.sigma = sigma
        self.mu = mu
        self.num_layers = base.num_layers
        self.name = f"{base.name}~lognormal({mu:g},{sigma:g})"
        self._rng = random.Random(seed)

    def unit_cost(self, items: Sequence[ItemShape]) -> UnitCost:
        cost = self.base.unit_cost(items)
        factor = math.exp(self._rng.gauss(self.mu, self.sigma)) if self.sigma else math.exp(self.mu)
        return replace(
            cost,
            overhead_s=cost.overhead_s * factor,
            attention_s=cost.attention_s * factor,
            mlp_s=cost.mlp_s * factor,
            tail_s=cost.tail_s * factor,
        )
