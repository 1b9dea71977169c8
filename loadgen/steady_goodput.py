"""Goodput read off a grid of steady trials (issue 14, section 2), two ways.

A trial is a dict with ``rate_rps``, ``attainment`` (0..1, of the steady requests), ``stable``
(its backlog drained in time) and, where a rate was run more than once, ``repeat``.

- ``grid_goodput``: the highest grid rate at and below which *every* repeat held the target
  and was stable: a strict reading that one unlucky repeat can pull down a whole step.
- ``mean_curve_goodput``: where the *mean* attainment-versus-rate curve crosses the target,
  interpolated linearly between the last grid rate that held it and the first that did not,
  and the same crossing on each repeat's own curve, so the spread of the repeats is shown.

An unstable rate is never interpolated into: its attainment only counts the requests that were
served before the trial ended, so the crossing is put at the last rate that held (a lower
bound). A crossing below the lowest grid rate reads 0 (the grid does not reach down to it).
"""

from __future__ import annotations

import statistics
from typing import Any


def _by_rate(trials: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """``trials`` grouped by rate, rates ascending."""
    groups: dict[float, list[dict[str, Any]]] = {}
    for t in sorted(trials, key=lambda t: t["rate_rps"]):
        groups.setdefault(t["rate_rps"], []).append(t)
    return groups


def grid_goodput(trials: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The strict and the mean-curve readings of ``trials`` at ``target``. ``censored``: the
    top rate passed too, so the (strict) goodput is only a lower bound."""
    groups = _by_rate(trials)
    rates = list(groups)
    passed = {
        rate: all((t["attainment"] or 0.0) >= target and t["stable"] for t in at_rate)
        for rate, at_rate in groups.items()
    }
    first_fail = next((i for i, rate in enumerate(rates) if not passed[rate]), len(rates))
    return {
        "goodput_rps": rates[first_fail - 1] if first_fail else 0.0,
        "censored": bool(rates) and first_fail == len(rates),
        "passed_by_rate": {f"{rate:.4g}": passed[rate] for rate in rates},
        "attainment_by_rate": {
            f"{rate:.4g}": [t["attainment"] for t in at_rate] for rate, at_rate in groups.items()
        },
        **mean_curve_goodput(trials, target),
    }


def curve_crossing(points: list[tuple[float, float | None]], target: float) -> float:
    """The rate where ``points`` ((rate, attainment), ascending; ``None`` = unstable) first
    falls below ``target``, linearly interpolated; the top rate when it never does."""
    last: tuple[float, float] | None = None
    for rate, attainment in points:
        if attainment is not None and attainment >= target:
            last = (rate, attainment)
            continue
        if last is None:
            return 0.0
        if attainment is None:
            return last[0]
        held_rate, held = last
        return held_rate + (held - target) / (held - attainment) * (rate - held_rate)
    return points[-1][0] if points else 0.0


def mean_curve(trials: list[dict[str, Any]]) -> list[tuple[float, float | None]]:
    """(rate, mean attainment of its trials, or None if any was unstable), rates ascending."""
    return [
        (
            rate,
            statistics.fmean(t["attainment"] or 0.0 for t in at_rate)
            if all(t["stable"] for t in at_rate)
            else None,
        )
        for rate, at_rate in _by_rate(trials).items()
    ]


def mean_curve_goodput(trials: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """``goodput_mean_curve_rps`` off the mean curve, ``goodput_by_repeat_rps`` off each
    repeat's own curve, and ``mean_curve`` itself ([rate, mean attainment or None])."""
    curve = mean_curve(trials)
    repeats = sorted({t["repeat"] for t in trials if "repeat" in t})
    by_repeat = [
        curve_crossing(mean_curve([t for t in trials if t.get("repeat") == k]), target)
        for k in repeats
    ]
    return {
        "goodput_mean_curve_rps": curve_crossing(curve, target),
        "goodput_by_repeat_rps": by_repeat,
        "mean_curve": [[rate, mean] for rate, mean in curve],
    }
