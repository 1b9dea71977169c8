"""Why were a run's requests late? The why-late attribution of saved trial timelines, as JSON.

Every steady trial of ``benchmarks/peer_vllm.py`` leaves our scheduler's ``timeline.json``
under its ``--run-dir`` (git-ignored, megabytes). This keeps what the docs cite of them: per
trial, the causes summed per SLO class (``flowprefill_ray.scheduling.why_late.summarize``),
where each missed request was when it turned late, and how long the demoted ones then waited.

    .venv/bin/python scripts/why_late_runs.py results/live_steady_vllm/r*/flowprefill/*/timeline.json \
        --run-json docs/results/live_goodput_steady_vllm.json \
        --out docs/results/live_goodput_steady_vllm_why_late.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def trial_reading(timeline: dict[str, Any]) -> dict[str, Any]:
    """One trial: the summary, the (class, where it turned late, cause) counts of its misses,
    and the median time a ``paused_after_late`` miss spent stalled after turning late."""
    from flowprefill_ray.scheduling.why_late import summarize, why_late

    verdicts = why_late(timeline)
    turned = Counter(f"{v['slo_class']}/{v['turned_late_in']}/{v['cause']}" for v in verdicts)
    stalled = [v["stalled_after_late_s"] for v in verdicts if v["cause"] == "paused_after_late"]
    return {
        "summary": summarize(timeline, verdicts)["rows"],
        "misses_by_class_turned_late_in_cause": dict(turned.most_common()),
        "paused_after_late_stalled_s_median": statistics.median(stalled) if stalled else None,
    }


def main(argv: list[str] | None = None) -> int:
    from provenance import measured_run, write_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("timelines", nargs="+", help="timeline.json of our trials")
    p.add_argument("--run-json", default=None, help="the run's JSON, for the commit measured")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    trials = {path: trial_reading(json.loads(Path(path).read_text())) for path in args.timelines}
    for path, reading in trials.items():
        row = reading["summary"]["all"]
        print(f"{path}: {row['missed']} missed, {row['rejected']} refused; causes:")
        for key, count in reading["misses_by_class_turned_late_in_cause"].items():
            print(f"    {count:4d} {key}")
    write_report(
        args.out,
        __file__,
        argv,
        "why_late_runs",
        **measured_run(args.run_json),
        trials=trials,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
