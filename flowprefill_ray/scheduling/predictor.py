"""TTFT predictor: prompt tokens -> prefill seconds.

Fitted offline from profile points (single prefills at various lengths): a cubic least-squares
fit (on relative errors by default, see ``PredictorConfig.fit_weighting``), points whose normalised residual ``|y - fit| / y`` exceeds ``outlier_threshold`` are
dropped, and the cubic is refitted. The fit is tabulated for every token count in the profiled
range so that ``predict`` is a list lookup (it runs for every request on every event).

Beyond the profiled range the release's rule is used: a long prompt runs as full
``chunk_tokens`` chunks back to back, so ``n = q * chunk + r`` costs
``q * (pred(chunk) + chunk_overhead_s) + pred(r)``. Where that needs a length the profile did
not reach (it stopped short of a chunk), the fit is extrapolated, but only in a way a prefill
can behave: the cubic if it keeps rising and bending upwards past the profile (never below
linear growth from the last profiled point), otherwise a power law ``pred(M) * (n / M) ** e``
from the top of the profile with ``1 <= e <= 2`` (the MLP grows linearly, attention at most
quadratically). A cubic fitted to short prompts alone often turns down past them; extrapolated
as is it once predicted 0 s for every prompt over ~1500 tokens.

Online correction (not in the release): ``observe(tokens, seconds)`` feeds measured prefill
times; the ratio measured / predicted is smoothed with an EWMA and multiplies every prediction,
bounded to ``[min_correction, max_correction]`` so one wild measurement cannot wreck the
schedule. ``observe_unit_overhead(seconds)`` learns, the same way, what each unit costs beyond
its compute on a live runtime (dispatch and report round trips, ~5 ms per unit on CPU) and adds
it to every prediction: a queue of 100 units is then predicted 0.5 s longer, as it runs.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

# The overrun percentile is taken over this many recent units.
_RATIO_WINDOW = 128


class PredictorConfig(BaseModel):
    """How the predictor fits and corrects itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fit_weighting: Literal["relative", "absolute"] = Field(
        "relative",
        description="least squares on relative errors (weights 1/y) or on absolute seconds",
    )
    outlier_threshold: PositiveFloat = Field(
        0.4, description="drop profile points with |residual| / y above this, then refit"
    )
    chunk_tokens: PositiveInt = Field(
        8192, description="chunk length used beyond the profiled range, tokens"
    )
    chunk_overhead_s: float = Field(
        0.010, ge=0.0, description="per-chunk scheduling cost beyond the profiled range, s"
    )
    ewma_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="weight of the newest observed/predicted ratio"
    )
    min_correction: PositiveFloat = 0.25
    max_correction: PositiveFloat = 4.0
    max_unit_overhead_s: float = Field(
        0.5, ge=0.0, description="cap on the learned per-unit overhead (observe_unit_overhead), s"
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> PredictorConfig:
        if not self.min_correction <= 1.0 <= self.max_correction:
            raise ValueError(
                "need min_correction <= 1 <= max_correction, got "
                f"{self.min_correction} and {self.max_correction}"
            )
        return self


class ProfilePoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: PositiveInt
    seconds: PositiveFloat


class PredictorFile(BaseModel):
    """What ``save`` writes: the fitted cubic and everything needed to rebuild the table."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field("flowprefill-ttft-predictor/1", pattern=r"^flowprefill-ttft-predictor/1$")
    coefficients: list[float] = Field(min_length=4, max_length=4)
    max_tokens: PositiveInt
    config: PredictorConfig
    correction: PositiveFloat = 1.0
    kept_points: list[ProfilePoint] = Field(default_factory=list)
    dropped_points: list[ProfilePoint] = Field(default_factory=list)


class TTFTPredictor:
    """Predicts prefill time in seconds from a token count. Build with ``fit`` or ``load``."""

    def __init__(
        self,
        coefficients: Iterable[float],
        max_tokens: int,
        config: PredictorConfig | None = None,
        correction: float = 1.0,
    ) -> None:
        """``coefficients``: cubic, highest power first (numpy ``polyfit`` order), in seconds.
        ``max_tokens``: upper end of the profiled range; the table covers ``0..max_tokens``."""
        self.config = config or PredictorConfig()
        self.coefficients = [float(c) for c in coefficients]
        if len(self.coefficients) != 4:
            raise ValueError(f"a cubic needs 4 coefficients, got {len(self.coefficients)}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        cfg = self.config
        self.correction = min(max(float(correction), cfg.min_correction), cfg.max_correction)
        # Seconds a unit costs on top of its compute where the policy runs (dispatch and
        # report round trips of a live runtime; 0 in the simulator): learned online by
        # ``observe_unit_overhead``, added to every prediction, never saved with the fit.
        self.unit_overhead_s = 0.0
        # Recent actual/predicted compute ratios (see ``overrun_ratio``).
        self._ratios: deque[float] = deque(maxlen=_RATIO_WINDOW)
        self._overrun = 1.0
        self._underrun = 1.0
        self.kept_points: list[tuple[int, float]] = []
        self.dropped_points: list[tuple[int, float]] = []
        self._table = self._tabulate()
        self._cubic_beyond, self._tail_exponent = self._extrapolation()
        chunk = cfg.chunk_tokens
        # The chunk rule needs pred(chunk) even if the profile stopped short of it.
        self._chunk_cost_s = (
            self._beyond_profile(chunk) if chunk > self.max_tokens else self._table[chunk]
        )

    # ------------------------------------------------------------------ building

    @classmethod
    def fit(
        cls, profile: Iterable[tuple[int, float]], config: PredictorConfig | None = None
    ) -> TTFTPredictor:
        """Fit from ``(tokens, seconds)`` profile points (at least 4 distinct token counts).

        Raises ``ValueError`` for too few points or non-positive values.
        """
        cfg = config or PredictorConfig()
        points = [ProfilePoint(tokens=t, seconds=s) for t, s in profile]
        if len({p.tokens for p in points}) < 4:
            raise ValueError(
                f"a cubic fit needs at least 4 distinct token counts, got {len(points)} points"
            )
        x = np.array([p.tokens for p in points], dtype=np.float64)
        y = np.array([p.seconds for p in points], dtype=np.float64)
        # The outlier test is relative, so by default the fit minimises relative error too:
        # with absolute errors the long prompts (large y) dominate and the short prompts -
        # the urgent ones - end up with large relative residuals and are dropped.
        weights = 1.0 / y if cfg.fit_weighting == "relative" else np.ones_like(y)
        coeffs = np.polyfit(x, y, 3, w=weights)
        keep = np.abs(y - np.polyval(coeffs, x)) / y <= cfg.outlier_threshold
        if len(np.unique(x[keep])) >= 4 and not keep.all():
            coeffs = np.polyfit(x[keep], y[keep], 3, w=weights[keep])
        else:
            keep = np.ones_like(keep)  # refitting on < 4 points is impossible: keep the first fit
        predictor = cls(coeffs.tolist(), int(x.max()), cfg)
        predictor.kept_points = [
            (p.tokens, p.seconds) for p, k in zip(points, keep, strict=True) if k
        ]
        predictor.dropped_points = [
            (p.tokens, p.seconds) for p, k in zip(points, keep, strict=True) if not k
        ]
        return predictor

    def _cubic_at(self, tokens: int) -> float:
        a, b, c, d = self.coefficients
        return max(((a * tokens + b) * tokens + c) * tokens + d, 0.0)

    def _extrapolation(self) -> tuple[bool, float]:
        """How to predict past the profiled range ``M``: (use the cubic?, power-law exponent).

        The cubic is trusted only if it rises and bends upwards at ``M`` and has a
        non-negative cubic term: then it rises for every longer prompt. The exponent is the
        log-log slope of the table's top octave, clamped to ``[1, 2]``."""
        a, b, c, _ = self.coefficients
        top = self.max_tokens
        rising = 3.0 * a * top * top + 2.0 * b * top + c > 0.0
        convex = 6.0 * a * top + 2.0 * b >= 0.0
        half = max(top // 2, 1)
        exponent = 1.0
        if half < top and 0.0 < self._table[half] < self._table[top]:
            exponent = math.log(self._table[top] / self._table[half]) / math.log(top / half)
        return (a >= 0.0 and rising and convex), min(max(exponent, 1.0), 2.0)

    def _beyond_profile(self, tokens: int) -> float:
        """Prediction for ``tokens`` > the profiled range (see the module docstring)."""
        top_s = self._table[self.max_tokens]
        ratio = tokens / self.max_tokens
        if self._cubic_beyond:
            return max(self._cubic_at(tokens), top_s * ratio)
        return top_s * ratio**self._tail_exponent

    @property
    def extrapolation(self) -> str:
        """How predictions past the profiled range are made (for logs and stats)."""
        if self._cubic_beyond:
            return f"cubic beyond {self.max_tokens} tokens"
        return f"power law n^{self._tail_exponent:.2f} beyond {self.max_tokens} tokens"

    def _tabulate(self) -> list[float]:
        n = np.arange(self.max_tokens + 1, dtype=np.float64)
        values = np.maximum(np.polyval(self.coefficients, n), 0.0)
        # A cubic can dip between profile points; more tokens never take less time, and the
        # scheduler's lazy queues rely on predictions not falling as a request shrinks.
        values = np.maximum.accumulate(values)
        values[0] = 0.0
        return values.tolist()

    # ------------------------------------------------------------------ predicting

    def predict_uncorrected(self, tokens: int) -> float:
        """The profile's prediction for a prefill of ``tokens`` tokens, seconds."""
        if tokens <= self.max_tokens:
            return self._table[tokens] if tokens > 0 else 0.0
        full, rest = divmod(tokens, self.config.chunk_tokens)
        # The remainder is shorter than a chunk; it can still exceed a profile that stopped
        # below the chunk length, and then the fit is extrapolated.
        rest_s = self._table[rest] if rest <= self.max_tokens else self._beyond_profile(rest)
        return full * (self._chunk_cost_s + self.config.chunk_overhead_s) + rest_s

    def predict(self, tokens: int) -> float:
        """Predicted prefill time for ``tokens`` prompt tokens (one request or a batch's
        total), seconds, including the online correction. O(1)."""
        if 0 < tokens <= self.max_tokens:
            return self._table[tokens] * self.correction + self.unit_overhead_s
        if tokens <= 0:
            return 0.0
        return self.predict_uncorrected(tokens) * self.correction + self.unit_overhead_s

    def observe(self, tokens: int, seconds: float) -> None:
        """Feed one measured prefill (``tokens`` total, ``seconds`` of compute)."""
        if tokens <= 0 or seconds <= 0.0:
            return
        base = self.predict_uncorrected(tokens)
        if base <= 0.0:
            return
        cfg = self.config
        # Against the prediction in force when the unit was priced (before this update).
        self._ratios.append(seconds / (base * self.correction))
        # Once per completed unit, not per event: sorting 128 floats costs a few microseconds.
        ordered = sorted(self._ratios)
        self._overrun = max(1.0, ordered[int(0.9 * (len(ordered) - 1))])
        self._underrun = min(1.0, ordered[int(0.1 * (len(ordered) - 1))])
        w = cfg.ewma_weight
        updated = (1.0 - w) * self.correction + w * (seconds / base)
        self.correction = min(max(updated, cfg.min_correction), cfg.max_correction)

    @property
    def overrun_ratio(self) -> float:
        """The 90th percentile of actual/predicted compute over the last ``_RATIO_WINDOW``
        observed units, at least 1 (1 before any): how much longer than predicted one unit
        in ten ran, lately."""
        return self._overrun

    @property
    def underrun_ratio(self) -> float:
        """The 10th percentile of actual/predicted compute over the same recent units, at
        most 1 (1 before any): how much shorter than predicted one unit in ten ran, lately."""
        return self._underrun

    def observe_unit_overhead(self, seconds: float) -> None:
        """Feed one unit's wall time beyond its compute (from the policy's dispatch to the
        report of its completion, minus the compute the worker measured), seconds. Smoothed
        like the correction. Where nothing separates the two (the simulator) it stays 0."""
        if abs(seconds) < 1e-9:
            seconds = 0.0  # float noise of a driver whose clock is the compute itself
        w = self.config.ewma_weight
        updated = (1.0 - w) * self.unit_overhead_s + w * max(seconds, 0.0)
        self.unit_overhead_s = min(updated, self.config.max_unit_overhead_s)

    # ------------------------------------------------------------------ persistence

    def to_file_model(self) -> PredictorFile:
        return PredictorFile(
            coefficients=self.coefficients,
            max_tokens=self.max_tokens,
            config=self.config,
            correction=self.correction,
            kept_points=[ProfilePoint(tokens=t, seconds=s) for t, s in self.kept_points],
            dropped_points=[ProfilePoint(tokens=t, seconds=s) for t, s in self.dropped_points],
        )

    def save(self, path: str | Path) -> None:
        """Write the predictor (fit, config, current correction) as JSON."""
        Path(path).write_text(self.to_file_model().model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TTFTPredictor:
        """Read a predictor written by ``save``; raises ``pydantic.ValidationError`` naming the
        bad field if the file is not one."""
        data = PredictorFile.model_validate(json.loads(Path(path).read_text()))
        predictor = cls(data.coefficients, data.max_tokens, data.config, data.correction)
        predictor.kept_points = [(p.tokens, p.seconds) for p in data.kept_points]
        predictor.dropped_points = [(p.tokens, p.seconds) for p in data.dropped_points]
        return predictor

    @classmethod
    def linear(cls, seconds_per_token: float, max_tokens: int = 8192) -> TTFTPredictor:
        """A predictor of ``seconds_per_token * tokens`` (for tests and simple simulations)."""
        return cls([0.0, 0.0, seconds_per_token, 0.0], max_tokens)
