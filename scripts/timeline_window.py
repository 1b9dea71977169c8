"""Draw the Gantt chart of a saved timeline around its first missed request.

    .venv/bin/python scripts/timeline_window.py results/why_late_before/timeline.json \
        docs/results/why_late_before_gantt.png --title "before"

A whole replay is minutes wide, too wide to read; this keeps the requests that arrived from
``--before`` seconds before the first missed request's arrival to ``--after`` seconds after
it, with every unit they joined, and draws them with ``flowprefill_ray.timeline_plot``.
"""

from __future__ import annotations

import argparse
import json
import sys

from flowprefill_ray.scheduling.why_late import why_late
from flowprefill_ray.timeline_plot import draw_gantt


def window(export: dict, start_s: float, end_s: float) -> dict:
    """The part of ``export`` about requests arriving in ``[start_s, end_s)``."""
    requests = [r for r in export["requests"] if start_s <= r["arrival_s"] < end_s]
    ids = {r["request_id"] for r in requests}
    units = [u for u in export["units"] if any(m["request_id"] in ids for m in u["members"])]
    last = max([u["ended_s"] or end_s for u in units] + [end_s])
    return {**export, "requests": requests, "units": units, "now_s": last}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("timeline", help="a timeline.json saved by a replay")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--before", type=float, default=20.0, help="seconds before the first miss")
    p.add_argument("--after", type=float, default=40.0, help="seconds after the first miss")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    with open(args.timeline) as f:
        export = json.load(f)
    verdicts = why_late(export)
    if not verdicts:
        print("no missed request in this timeline", file=sys.stderr)
        return 1
    missed = {v["request_id"] for v in verdicts}
    first = min(r["arrival_s"] for r in export["requests"] if r["request_id"] in missed)
    part = window(export, first - args.before, first + args.after)
    kept = {r["request_id"] for r in part["requests"]}
    title = f"{args.title}: " if args.title else ""
    draw_gantt(
        part,
        args.out,
        [v for v in verdicts if v["request_id"] in kept],
        title=f"{title}{args.before + args.after:g} s around the first missed request",
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
