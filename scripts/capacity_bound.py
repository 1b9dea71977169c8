"""The capacity bound of a live trial (issue 14, section 2): the arrival rate at which the
prefill of the cheapest 90 % of its requests keeps every prefill worker 100 % busy.

No server can hold 90 % attainment above it for long: even serving only the cheapest 90 %,
its workers would need more than all their time. Goodput over this bound says how much of
the hardware a scheduler turns into requests within their SLOs.

Read off our scheduler's timeline of a trial (``timeline.json``, written by every steady
trial of ``benchmarks/peer_vllm.py`` under its ``--run-dir``):

- each request's prefill alone is what the scheduler predicted for it on arrival
  (``predicted_s``), scaled by how long single-request units of the same trial actually ran
  against their prediction (the median ratio): on these shared cores that is the prefill
  worker's real speed with decode, proxy and client beside it;
- the workers are those the timeline's units ran on.

    .venv/bin/python scripts/capacity_bound.py results/live_steady/r*/flowprefill/*/timeline.json \
        --run-json docs/results/live_goodput_steady.json \
        --out docs/results/live_goodput_steady_capacity.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def single_request_ratio(units: list[dict[str, Any]]) -> tuple[float, int]:
    """Median actual / predicted compute of the completed, never-paused units of one
    request (its whole prompt in one piece), and how many there were."""
    ratios = [
        u["actual_s"] / u["predicted_s"]
        for u in units
        if u["outcome"] == "completed"
        and len(u["members"]) == 1
        and not u["pauses"]
        and u["actual_s"]
        and u["predicted_s"] > 0
    ]
    if not ratios:
        raise ValueError("no completed single-request unit to calibrate the prediction with")
    return statistics.median(ratios), len(ratios)


def capacity_bound(timeline: dict[str, Any], share: float = 0.9) -> dict[str, Any]:
    """The bound of one trial's timeline (see the module doc)."""
    requests, units = timeline["requests"], timeline["units"]
    ratio, calibrated_on = single_request_ratio(units)
    costs = sorted(r["predicted_s"] * ratio for r in requests)
    cheapest = costs[: math.ceil(share * len(costs))]
    workers = len({u["worker_id"] for u in units})
    return {
        "requests": len(costs),
        "workers": workers,
        "actual_over_predicted": ratio,
        "calibrating_units": calibrated_on,
        "cheapest_share": share,
        "cheapest_prefill_s_mean": statistics.fmean(cheapest),
        "capacity_bound_rps": workers * len(costs) / sum(cheapest),
    }


def main(argv: list[str] | None = None) -> int:
    from provenance import measured_run, write_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("timelines", nargs="+", help="timeline.json of our steady trials")
    p.add_argument("--share", type=float, default=0.9, help="the cheapest share of requests")
    p.add_argument(
        "--run-json", default=None, help="the run's JSON, to record which commit it measured"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    trials = {}
    for path in args.timelines:
        bound = capacity_bound(json.loads(Path(path).read_text()), args.share)
        trials[path] = bound
        print(
            f"{path}: {bound['capacity_bound_rps']:.3f} req/s "
            f"(x{bound['actual_over_predicted']:.2f} of predicted, "
            f"{bound['calibrating_units']} units)"
        )
    bounds = [b["capacity_bound_rps"] for b in trials.values()]
    write_report(
        args.out,
        __file__,
        argv,
        "capacity_bound",
        **measured_run(args.run_json),
        trials=trials,
        capacity_bound_rps_median=statistics.median(bounds),
        capacity_bound_rps_range=[min(bounds), max(bounds)],
    )
    print(
        f"median {statistics.median(bounds):.3f} req/s, range {min(bounds):.3f}-{max(bounds):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
