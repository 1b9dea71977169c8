"""Goodput of a live endpoint: the highest rate scale at which >= 90 % of requests meet their
TTFT SLO (DistServe's definition), found by ``flowprefill_ray.simulator.goodput.find_goodput``
(the same bracket-and-bisect search the simulator uses) with each trial a real replay.

Every trial replays the same requests (same trace slice, lengths, classes, prompt ids: the seed
is fixed); only the gaps between arrivals shrink as the rate scale grows. Each trial's results
are written to ``<out>/x<scale>/``. Live trials are noisy (the machine is shared), so the
search tolerance is coarse by default and every trial is kept as an attainment-vs-rate point.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.simulator.goodput import GoodputSearchConfig, find_goodput

from .config import EndpointConfig, ReplayConfig
from .output import write_results
from .plan import load_trace_workload, plan_requests, ttft_targets
from .runner import run_open_loop
from .server_timeline import save_timeline
from .summary import summarize


@dataclass(frozen=True)
class LiveTrial:
    """One replay at ``rate_scale``: its overall TTFT attainment (0..1; what the search reads),
    the planned request rate in requests/s and the full summary."""

    rate_scale: float
    attainment: float
    rate_rps: float
    summary: dict[str, Any]


def planned_rate_rps(send_offsets_s: list[float]) -> float:
    """Requests per second of a plan: (n - 1) / span of its send offsets (0 if undefined)."""
    if len(send_offsets_s) < 2:
        return 0.0
    span = max(send_offsets_s) - min(send_offsets_s)
    return (len(send_offsets_s) - 1) / span if span > 0 else 0.0


def run_trial(
    endpoint: EndpointConfig,
    replay: ReplayConfig,
    slo: SLOConfig,
    rate_scale: float,
    out_dir: Path | None,
    progress: bool = True,
) -> LiveTrial:
    """Replay ``replay`` at ``rate_scale`` once and summarise it (results under ``out_dir``)."""
    trial = replay.model_copy(update={"rate_scale": rate_scale})
    plan = plan_requests(load_trace_workload(trial.trace), trial, ttft_targets(slo))
    plan = [p for p in plan if p.send_at_s < trial.duration_s]
    result = asyncio.run(run_open_loop(endpoint, trial, plan, progress=progress))
    summary = summarize(result)
    if out_dir is not None:
        trial_dir = out_dir / f"x{rate_scale:.4g}"
        write_results(result, trial_dir, extra={"slo": slo.model_dump()})
        save_timeline(endpoint, trial_dir, len(plan))
    attainment = summary["overall"]["attainment"] or 0.0
    return LiveTrial(rate_scale, attainment, planned_rate_rps([p.send_at_s for p in plan]), summary)


def live_goodput_search(
    endpoint: EndpointConfig,
    replay: ReplayConfig,
    slo: SLOConfig,
    out_dir: Path | None,
    search: GoodputSearchConfig | None = None,
    cooldown_s: float = 2.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Bisect the live endpoint's goodput; returns (and writes to ``out_dir/goodput.json``) the
    goodput rate scale, the goodput in requests/s and every trial's attainment.

    ``cooldown_s``: pause between trials so requests a trial cancelled at its end have left
    the server before the next trial starts.
    """
    search = search or GoodputSearchConfig(
        rel_tol=0.15, max_evaluations=8, min_scale=0.05, max_scale=64
    )
    trials: list[LiveTrial] = []

    def run_at(scale: float) -> LiveTrial:
        if trials and cooldown_s > 0:
            time.sleep(cooldown_s)
        trial = run_trial(endpoint, replay, slo, scale, out_dir, progress)
        trials.append(trial)
        return trial

    found = find_goodput(run_at, search)
    passing = found.passing_result
    report = {
        "target": found.target,
        "goodput_rate_scale": found.rate_scale,
        "failing_rate_scale": found.failing_scale,
        "goodput_rps": passing.rate_rps if passing is not None else 0.0,
        "points": [
            {
                "rate_scale": t.rate_scale,
                "rate_rps": t.rate_rps,
                "attainment": t.attainment,
                "attainment_by_class": {
                    c: s["attainment"] for c, s in t.summary["per_class"].items()
                },
                "ttft_p99_s": t.summary["overall"]["ttft_s"]["p99"],
            }
            for t in sorted(trials, key=lambda t: t.rate_scale)
        ],
        "search": search.model_dump(),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "goodput.json").write_text(json.dumps(report, indent=1))
    return report
