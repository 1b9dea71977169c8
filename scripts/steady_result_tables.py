"""The tables of the steady-state live goodput runs (issue 14, sections 2-3): the shipped app
and the strongest baselines on one grid of rates, read both ways (``loadgen.steady_goodput``)
and set against the capacity bound (``scripts/capacity_bound.py``). Registered in
``result_tables.TABLES`` like the other live tables.
"""

from __future__ import annotations

from typing import Any

from live_result_tables import peer_overtake
from result_tables import pct, rows, table

# ------------------------------------------------------------ live_goodput_steady.json

# The same per-rate table for the live baselines run beside the shipped app, and for the
# shipped app alone further up the same grid.
table("live_steady_trials", "live_goodput_steady.json")(peer_overtake)
table("live_steady_trials_high", "live_goodput_steady_high.json")(peer_overtake)
table("live_steady_trials_srpf512", "live_goodput_steady_srpf512.json")(peer_overtake)

# vLLM (priority and fcfs, at its best budget) beside the shipped app, and the two that were
# still above 90 % further up the grid: read together, not merged with the runs above (a ratio
# needs both sides measured in the same runs).
STEADY_VLLM_RUNS = ("live_goodput_steady_vllm.json", "live_goodput_steady_vllm_high.json")
table("live_steady_trials_vllm", STEADY_VLLM_RUNS[0])(peer_overtake)
table("live_steady_trials_vllm_high", STEADY_VLLM_RUNS[1])(peer_overtake)

STEADY_RUNS = (
    "live_goodput_steady.json",
    "live_goodput_steady_high.json",
    "live_goodput_steady_srpf512.json",
)


def steady_readings(*reports: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system, the goodput readings (``loadgen.steady_goodput.grid_goodput``, as the
    benchmark now records them) of its trials in all ``reports`` together (runs on one grid
    of rates, with the same rules)."""
    from loadgen.steady_goodput import grid_goodput

    targets = {r["rules"]["target"] for r in reports}
    if len(targets) != 1:
        raise ValueError(f"runs with different attainment targets: {sorted(targets)}")
    (target,) = targets
    trials: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for name, system in report["systems"].items():
            trials.setdefault(name, []).extend(system["trials"])
    return {name: grid_goodput(ts, target) for name, ts in trials.items()}


@table("live_steady_goodput", *STEADY_RUNS, "live_goodput_steady_capacity.json")
def live_steady_goodput(*reports: dict[str, Any]) -> str:
    """Per system: the strict grid goodput, the mean-curve goodput with each session's own
    crossing, over the capacity bound, and the shipped app's ratios over it."""
    *runs, capacity = reports
    bound = capacity["capacity_bound_rps_median"]
    readings = steady_readings(*runs)
    ours = readings["flowprefill"]
    body = []
    for name, g in readings.items():
        strict = f"{g['goodput_rps']:.3f}" + (" (top rate held)" if g["censored"] else "")
        body.append(
            [
                f"`{name}`",
                strict,
                f"{g['goodput_mean_curve_rps']:.3f}",
                " / ".join(f"{x:.3f}" for x in g["goodput_by_repeat_rps"]),
                pct(g["goodput_mean_curve_rps"] / bound),
                "" if name == "flowprefill" else ratio_pair(ours, g),
            ]
        )
    header = ["system", "goodput, every session held (req/s)", "goodput, mean curve (req/s)"]
    header += ["each session's crossing", f"mean curve / capacity bound ({bound:.2f} req/s)"]
    return rows(header + ["shipped / this (strict, curve)"], body)


# The same readings for the shipped app and vLLM, run side by side.
table("live_steady_vllm_goodput", *STEADY_VLLM_RUNS, "live_goodput_steady_capacity.json")(
    live_steady_goodput
)


def ratio_pair(ours: dict[str, Any], other: dict[str, Any]) -> str:
    def one(key: str) -> str:
        return f"{ours[key] / other[key]:.2f}x" if other[key] else "-"

    return f"{one('goodput_rps')}, {one('goodput_mean_curve_rps')}"
