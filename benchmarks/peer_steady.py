"""Steady-state trials of one OpenAI-compatible endpoint on a grid of rates (issue 14, section 2).

The rules a trial follows, whatever server it measures (``SteadyRules``):

- it sends for ``warmup_s`` plus at least ``min_steady_s`` seconds and at least
  ``min_requests`` requests after the warm-up; requests sent during the warm-up are left out;
- it is *unstable* when a request still had no first token ``2 x`` the loosest SLO after the
  last send (the backlog did not drain: the rate is past what the server sustains);
- rates are a grid of fractions of a measured capacity (``measure_capacity``: a burst of the
  trace's own requests, served requests per second over the burst), and each rate is run
  ``repeats`` times; a rate passes when every repeat held the attainment target and was
  stable, and the goodput is the highest rate of the grid at and below which every rate passed.

Each trial replays the trace at the rate scale that makes its window hold exactly the target
rate (``rate_scale_for``), so every server measured at a rate gets the very same requests.
Attainment, stability and per-class TTFT come from ``why_late_replay.steady_summary``; the
replay itself is ``loadgen``'s open-loop runner.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# why_late_replay.py (and its provenance.py) lie beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from why_late_replay import sent_and_steady, steady_summary  # noqa: E402


class SteadyRules(BaseModel):
    """How long a trial runs and what makes a rate pass (seconds, requests, 0..1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_steady_s: float = Field(180.0, gt=0)
    min_requests: int = Field(300, ge=0)
    warmup_s: float = Field(30.0, ge=0)
    target: float = Field(0.9, gt=0, le=1)

    def sending_s(self, rate_rps: float) -> float:
        """Seconds of sending at ``rate_rps`` so the steady part meets both minimums."""
        return self.warmup_s + max(self.min_steady_s, self.min_requests / rate_rps)


def rate_scale_for(offsets_s: list[float], rate_rps: float, sending_s: float) -> float:
    """The rate scale at which ``sending_s`` seconds of the trace hold ``rate_rps`` requests
    per second: the trace's ``rate_rps * sending_s``-th request (``offsets_s``: its send
    offsets at scale 1, ascending) must fall at the end of the window."""
    wanted = max(2, round(rate_rps * sending_s))
    if wanted > len(offsets_s):
        raise ValueError(
            f"the trace has {len(offsets_s)} requests, {rate_rps:g} req/s for {sending_s:g} s "
            f"needs {wanted}"
        )
    return offsets_s[wanted - 1] / sending_s


def _plan(replay: Any, slo: Any) -> list:
    from loadgen.plan import load_trace_workload, plan_requests, ttft_targets

    return plan_requests(load_trace_workload(replay.trace), replay, ttft_targets(slo))


def trace_offsets_s(replay: Any, slo: Any) -> list[float]:
    """Send offsets of the whole trace slice at rate scale 1 (what ``rate_scale_for`` reads)."""
    whole = replay.model_copy(update={"rate_scale": 1.0, "max_requests": 1_000_000})
    return [p.send_at_s for p in _plan(whole, slo)]


def measure_capacity(endpoint: Any, replay: Any, slo: Any, requests: int) -> dict[str, Any]:
    """Served requests per second when the trace's first ``requests`` requests arrive at
    once: the server's throughput on this workload, the unit of the rate grid."""
    from loadgen.runner import run_open_loop

    burst = replay.model_copy(
        update={"rate_scale": 1e6, "max_requests": requests, "duration_s": 60.0, "drain_s": 900.0}
    )
    result = asyncio.run(run_open_loop(endpoint, burst, _plan(burst, slo), progress=False))
    ok = [r for r in result.records if r.status == "ok"]
    if not ok:
        raise RuntimeError(f"no request of the capacity burst succeeded: {result.records[0]}")
    span_s = max(r.end_s for r in ok) - min(r.sent_s for r in result.sent)
    return {
        "requests": requests,
        "served": len(ok),
        "rejected": sum(1 for r in result.records if r.http_status == 429),
        "span_s": span_s,
        "capacity_rps": len(ok) / span_s,
    }


def steady_trial(
    endpoint: Any,
    replay: Any,
    slo: Any,
    rate_rps: float,
    rules: SteadyRules,
    offsets_s: list[float],
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """One open-loop trial at ``rate_rps`` under ``rules``; returns its steady summary
    (attainment, per class, stable) with the TTFT percentiles of its steady requests."""
    from process_cpu import CpuWindow

    from loadgen.output import write_results
    from loadgen.runner import run_open_loop
    from loadgen.server_timeline import save_timeline
    from loadgen.stats import percentile
    from loadgen.ttft_path import ttft_path

    loosest = max(slo.resolve(name).ttft_slo_s for name in slo.class_names)
    sending_s = rules.sending_s(rate_rps)
    trial = replay.model_copy(
        update={
            "rate_scale": rate_scale_for(offsets_s, rate_rps, sending_s),
            "max_requests": 1_000_000,
            "duration_s": sending_s,
            # Past 2 x the loosest SLO a request is judged stuck anyway; the margin lets the
            # stragglers finish so their TTFT is known.
            "drain_s": 2 * loosest + 30.0,
        }
    )
    plan = [p for p in _plan(trial, slo) if p.send_at_s < sending_s]
    # Where the host's CPU went during the trial, per kind of process (server, proxy, client).
    with CpuWindow() as cpu:
        result = asyncio.run(run_open_loop(endpoint, trial, plan, progress=False))
    if out_dir is not None:
        write_results(result, out_dir, extra={"slo": slo.model_dump()})
        # Our server's scheduler timeline of every request of the trial (what each waited
        # for; vLLM has none): how a trial that stalled or missed is explained afterwards.
        save_timeline(endpoint, out_dir, len(plan) + 100)
    steady = steady_summary(result.records, rules.warmup_s, loosest)
    sent, steady_sent = sent_and_steady(result.records, rules.warmup_s)
    ttfts = [r.ttft_s for r in steady_sent if r.ttft_s is not None]
    # Our server only: where the steady requests' TTFT went, hop by hop (None for vLLM).
    path = ttft_path(steady_sent)
    return {
        "rate_rps": rate_rps,
        "rate_scale": trial.rate_scale,
        "sending_s": sending_s,
        "sent": len(sent),
        "prompt_tokens_mean": sum(r.prompt_tokens for r in sent) / max(1, len(sent)),
        "max_send_lag_s": max((r.send_lag_s for r in sent), default=None),
        "meets_rules": steady["steady_requests"] >= rules.min_requests
        and sending_s - rules.warmup_s >= rules.min_steady_s,
        "ttft_s": {f"p{q}": percentile(ttfts, q) for q in (50, 90, 99)},
        **steady,
        **({"ttft_path": path} if path is not None else {}),
        "cpu": cpu.result(),
    }


def grid_rates(capacity_rps: float, fractions: list[float]) -> list[float]:
    """The trial rates: ``fractions`` of ``capacity_rps``, ascending, rounded to 1e-3 req/s
    so every system's trials at one rate are grouped together."""
    return sorted({round(capacity_rps * f, 3) for f in fractions})
