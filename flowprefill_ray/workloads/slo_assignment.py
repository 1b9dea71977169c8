"""Giving SLO classes to traces that have none (Azure, BurstGPT, Mooncake, synthetic).

The rule (documented with its reasons in docs/SIMULATOR.md):

1. Requests are ranked by prompt length. The classes, ordered tightest SLO first
   (text, image, search, file), split the length ranking into bands whose sizes are the class
   mix: with the default mix the shortest 40 % are ``text``, the next 20 % ``image``, etc.
2. With probability ``length_affinity`` a request takes the class of its band; otherwise it
   draws a class at random from the mix. Both draws come from one seeded RNG.

Why: in the trace FlowPrefill was evaluated on (Qwen-Bailian), the tight classes are
interactive chat (text, image) with short prompts, and the loose ones (search, file) carry
retrieved pages or whole documents, so SLO tightness falls as prompt length grows. That
anti-correlation is exactly what makes head-of-line blocking hurt: long loose prefills hold the
GPU while short urgent ones wait. The random share keeps some long-tight and short-loose
requests, as real traffic has, so that a policy cannot win by being shortest-job-first alone.
The overall mix of classes equals ``mix`` exactly in expectation, whatever the affinity.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .trace import Workload

PAPER_CLASSES = ("text", "image", "search", "file")


class SLOAssignmentConfig(BaseModel):
    """``mix``: class -> share of requests, ordered tightest SLO first (shares need not sum to
    1; they are normalised). ``length_affinity``: probability (0..1) that a request's class
    follows its prompt-length band instead of a random draw. ``overwrite``: also replace
    classes a trace already has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mix: dict[str, float] = {"text": 0.4, "image": 0.2, "search": 0.2, "file": 0.2}
    length_affinity: float = Field(default=0.8, ge=0.0, le=1.0)
    overwrite: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _positive_mix(self) -> SLOAssignmentConfig:
        if not self.mix:
            raise ValueError("the SLO class mix is empty")
        bad = {k: v for k, v in self.mix.items() if not v >= 0}
        if bad or sum(self.mix.values()) <= 0:
            raise ValueError(f"SLO class shares must be >= 0 with a positive sum, got {self.mix}")
        return self


def assign_slo_classes(workload: Workload, config: SLOAssignmentConfig | None = None) -> Workload:
    """A copy of ``workload`` where every request without a class (all of them, with
    ``overwrite``) gets one by the rule in the module docstring."""
    config = config or SLOAssignmentConfig()
    n = len(workload)
    if n == 0:
        return workload
    names = list(config.mix)
    total = sum(config.mix.values())
    cumulative = []
    acc = 0.0
    for name in names:
        acc += config.mix[name] / total
        cumulative.append(acc)
    cumulative[-1] = 1.0  # guard against rounding leaving the longest request without a band

    # Rank by prompt length; ties broken by arrival order so the result is deterministic.
    order = sorted(range(n), key=lambda i: (workload[i].prompt_tokens, i))
    band_of = [0] * n
    band = 0
    for rank, i in enumerate(order):
        quantile = (rank + 0.5) / n
        while quantile > cumulative[band]:
            band += 1
        band_of[i] = band

    rng = random.Random(config.seed)
    weights = [config.mix[name] for name in names]
    classes: list[str | None] = []
    for i, record in enumerate(workload):
        # Draw both numbers for every request so the classes of one request do not depend on
        # whether earlier requests already had classes.
        follow_band = rng.random() < config.length_affinity
        random_class = rng.choices(names, weights)[0]
        if record.slo_class is not None and not config.overwrite:
            classes.append(record.slo_class)
        else:
            classes.append(names[band_of[i]] if follow_band else random_class)
    return workload.with_slo_classes(classes)
