"""A cost model fitted to block latencies measured on our own model (scripts/profile_model.py).

Fitted forms (seconds; ``T`` = new tokens in the unit, summed over its sequences; per
sequence ``pairs = T_i * C_i + T_i (T_i + 1) / 2`` causal query-key pairs, ``C_i`` = earlier KV):

- attention block: ``a0 + a1 * T + a2 * sum(pairs)`` (projections linear in T, attention
  core linear in the query-key pairs),
- MLP block:       ``m0 + m1 * T``,
- unit overhead:   ``o0 + o1 * T`` (embedding, packing, starting the forward),
- tail:            ``t0 + t1 * sequences`` (final norm + logits of each last token).

The fit is a non-negative least squares over the measured points so that no term can go
negative and make bigger units cheaper.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .cost_model import ItemShape, UnitCost


class BlockMeasurement(BaseModel):
    """One timed unit: its sequences' (new, context) tokens and the median block times (s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[tuple[int, int]]
    attention_s: float = Field(ge=0)
    mlp_s: float = Field(ge=0)
    overhead_s: float = Field(ge=0)
    tail_s: float = Field(ge=0)
    total_s: float = Field(ge=0)


class MeasuredProfile(BaseModel):
    """Coefficients of the forms in the module docstring, plus how they were obtained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_layers: int = Field(gt=0)
    attention: tuple[float, float, float]  # a0 [s], a1 [s/token], a2 [s/pair]
    mlp: tuple[float, float]  # m0 [s], m1 [s/token]
    overhead: tuple[float, float]  # o0 [s], o1 [s/token]
    tail: tuple[float, float]  # t0 [s], t1 [s/sequence]
    provenance: dict[str, str | int | float] = {}
    measurements: list[BlockMeasurement] = []

    @classmethod
    def load(cls, path: str | Path) -> MeasuredProfile:
        """Read a profile JSON written by ``scripts/profile_model.py``."""
        return cls.model_validate(json.loads(Path(path).read_text()))


PROFILES_DIR = Path(__file__).with_name("profiles")

# The profiles committed with the package, by the model the live system serves: ``tiny`` is
# docs/ENVIRONMENT's random-weight tiny Llama, ``default`` the embedded SmolLM2-135M; both
# measured on one CPU thread of the development machine (a prefill worker's share).
PROFILES = {"tiny": "tiny_cpu.json", "default": "smollm2_cpu.json"}


def default_profile_path() -> Path:
    """The profile of the tiny CPU model committed with the package."""
    return PROFILES_DIR / PROFILES["tiny"]


def profile_path(model: str) -> Path:
    """The committed profile of ``model`` (a key of ``PROFILES``)."""
    if model not in PROFILES:
        raise ValueError(
            f"no committed simulator profile for model {model!r}; known: {sorted(PROFILES)} "
            "(measure one with python scripts/profile_model.py --model ...)"
        )
    return PROFILES_DIR / PROFILES[model]


def _pairs(item: ItemShape) -> float:
    t, c = item.new_tokens, item.context_tokens
    return t * c + t * (t + 1) / 2


def fit_profile(
    name: str,
    num_layers: int,
    measurements: Sequence[BlockMeasurement],
    provenance: dict | None = None,
) -> MeasuredProfile:
    """Fit the coefficient of each form to the measurements (non-negative least squares)."""
    import numpy as np

    def nnls(rows: list[list[float]], y: list[float]) -> list[float]:
        a = np.asarray(rows, dtype=np.float64)
        b = np.asarray(y, dtype=np.float64)
        # Weight by 1/y so short units (where preemption latency matters) fit as well as long.
        w = 1.0 / np.maximum(b, 1e-6)
        a, b = a * w[:, None], b * w
        active = list(range(a.shape[1]))
        while True:  # drop the most negative coefficient and refit until all are >= 0
            coef = np.zeros(a.shape[1])
            sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
            coef[active] = sol
            if (coef >= 0).all() or not active:
                return coef.tolist()
            active.remove(active[int(np.argmin(sol))])

    shapes = [[ItemShape(t, c) for t, c in m.items] for m in measurements]
    tokens = [float(sum(i.new_tokens for i in s)) for s in shapes]
    attention = nnls(
        [[1.0, t, sum(_pairs(i) for i in s)] for t, s in zip(tokens, shapes, strict=True)],
        [m.attention_s for m in measurements],
    )
    mlp = nnls([[1.0, t] for t in tokens], [m.mlp_s for m in measurements])
    overhead = nnls([[1.0, t] for t in tokens], [m.overhead_s for m in measurements])
    tail = nnls([[1.0, float(len(s))] for s in shapes], [m.tail_s for m in measurements])
    return MeasuredProfile(
        name=name,
        num_layers=num_layers,
        attention=tuple(attention),
        mlp=tuple(mlp),
        overhead=tuple(overhead),
        tail=tuple(tail),
        provenance=provenance or {},
        measurements=list(measurements),
    )


class MeasuredCostModel:
    """Prices units with a ``MeasuredProfile``'s fitted block latencies."""

    def __init__(self, profile: MeasuredProfile | None = None) -> None:
        self.profile = profile or MeasuredProfile.load(default_profile_path())
        self.num_layers = self.profile.num_layers
        self.name = f"measured-{self.profile.name}"

    def unit_cost(self, items: Sequence[ItemShape]) -> UnitCost:
        p = self.profile
        t = sum(it.new_tokens for it in items)
        pairs = sum(_pairs(it) for it in items)
        a0, a1, a2 = p.attention
        m0, m1 = p.mlp
        o0, o1 = p.overhead
        t0, t1 = p.tail
        return UnitCost(
            overhead_s=o0 + o1 * t,
            attention_s=a0 + a1 * t + a2 * pairs,
            mlp_s=m0 + m1 * t,
            num_layers=p.num_layers,
            tail_s=t0 + t1 * len(items),
        )
