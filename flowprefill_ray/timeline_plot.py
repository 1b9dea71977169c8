"""The scheduler timeline as a Gantt chart, and the ``flowprefill timeline`` command.

``draw_gantt(export, path)`` draws a ``Timeline.export`` dict: one row per prefill worker, each
unit's run spans as solid bars and its paused spans as hatched bars (the worker ran something
else meanwhile), member request ids written on the bar, every request's deadline as a tick on
the row of the worker that ran it last. Units holding a request that missed its target, and
those requests' deadline ticks and first tokens, are red; units dropped (evicted, or lost
with their worker) are grey.

``flowprefill timeline RUN_DIR_OR_JSON`` reads ``timeline.json`` (a run directory) or the JSON
file given, prints the why-late table (``scheduling.why_late``) and the missed requests, and
writes ``timeline.png`` next to the JSON. matplotlib (the ``plots`` extra) is imported only
when drawing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flowprefill_ray.scheduling.why_late import format_summary, summarize, why_late

_RUN, _RUN_MISSED, _DROPPED, _PAUSED = "#4c72b0", "#c44e52", "#999999", "#dddddd"
_LABELS = 3  # member ids written on a bar before "+n"
_CHARS_ACROSS = 200  # characters of the labels' font that fit across the plot


def draw_gantt(
    export: dict[str, Any],
    path: str | Path,
    verdicts: list[dict[str, Any]] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``export`` as a Gantt chart PNG to ``path`` (see the module docstring)."""
    from matplotlib.figure import Figure  # the `plots` extra; no pyplot, no global backend
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    verdicts = why_late(export) if verdicts is None else verdicts
    late = {v["request_id"]: v["cause"] for v in verdicts}
    requests = {r["request_id"]: r for r in export["requests"]}
    workers = list(export.get("workers") or [])
    for u in export["units"]:
        if u["worker_id"] not in workers:
            workers.append(u["worker_id"])
    row = {w: i for i, w in enumerate(workers)}
    now = export.get("now_s", 0.0)
    # The span where work ran; a later deadline was met or is still ahead (a missed one falls
    # before its late first token), so it is left out rather than squash the chart.
    left = min(
        [r["arrival_s"] for r in requests.values()] + [u["started_s"] for u in export["units"]]
        or [0.0]
    )
    right = max([now] + [u["ended_s"] or now for u in export["units"]])
    span = (right - left) or 1.0

    prefix = _common_prefix([r["request_id"] for r in requests.values()])
    fig = Figure(figsize=(12, 1.4 + 0.8 * max(len(workers), 1)))
    ax = fig.add_subplot()
    for u in export["units"]:
        y = row[u["worker_id"]]
        missed = any(m["request_id"] in late for m in u["members"])
        color = _RUN_MISSED if missed else _RUN
        if u["outcome"] in ("discarded", "lost"):
            color = _DROPPED
        runs = [(s, (now if e is None else e) - s) for s, e in u["runs"]]
        ax.broken_barh(runs, (y - 0.4, 0.45), facecolors=color, edgecolors="white", lw=0.5)
        # Paused spans get their own lane: the worker runs another unit meanwhile.
        gaps = [
            (p["paused_s"], _pause_end(p, u, now) - p["paused_s"])
            for p in u["pauses"]
            if _pause_end(p, u, now) > p["paused_s"]
        ]
        if gaps:
            ax.broken_barh(
                gaps, (y + 0.1, 0.15), facecolors=_PAUSED, edgecolors=color, hatch="///", lw=0.5
            )
        start, length = max(runs, key=lambda r: r[1])
        label = _member_label(u, late, prefix)
        if len(label) <= length / span * _CHARS_ACROSS:  # only where it fits
            ax.text(
                start + length / 2,
                y - 0.175,
                label,
                ha="center",
                va="center",
                fontsize=6,
                color="white",
                clip_on=True,
            )
    units = {u["unit_id"]: u for u in export["units"]}
    for r in requests.values():
        last = units.get(r["units"][-1]["unit_id"]) if r["units"] else None
        if last is None:
            continue
        y = row[last["worker_id"]]
        missed = r["request_id"] in late
        color = _RUN_MISSED if missed else "black"
        if r["deadline_s"] <= right:
            ax.vlines(r["deadline_s"], y + 0.28, y + 0.45, colors=color, lw=0.8)
        if missed and r["first_token_s"] is not None:
            ax.plot([r["first_token_s"]], [y + 0.36], marker="x", color=_RUN_MISSED, ms=4)

    ax.set_yticks(range(len(workers)), workers)
    ax.set_ylim(-0.6, len(workers) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(left - span / 50, right + span / 50)
    ax.set_xlabel("time (s)")
    shown = len(requests)
    ax.set_title(
        title or f"scheduler timeline: {shown} requests, {len(late)} missed their TTFT target",
        loc="left",
        fontsize=10,
    )
    ax.legend(
        handles=[
            Patch(color=_RUN, label="unit running"),
            Patch(color=_RUN_MISSED, label="holds a missed request (id!)"),
            Patch(facecolor=_PAUSED, edgecolor=_RUN, hatch="///", label="unit paused"),
            Patch(color=_DROPPED, label="evicted / lost"),
            Line2D([], [], color="black", marker="|", ls="", label="deadline"),
            Line2D([], [], color=_RUN_MISSED, marker="x", ls="", label="late first token"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        ncols=3,
        frameon=False,
    )
    ax.grid(axis="x", lw=0.3)
    if prefix:
        ax.text(
            0.0,
            -0.2,
            f"request ids without the prefix {prefix!r}",
            fontsize=7,
            transform=ax.transAxes,
        )
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _common_prefix(ids: list[str]) -> str:
    """The prefix all ids share (a trace name), up to its last separator, so ids stay whole."""
    if len(ids) < 2:
        return ""
    first, last = min(ids), max(ids)
    n = 0
    while n < len(first) - 1 and first[n] == last[n]:
        n += 1
    cut = max(first.rfind(sep, 0, n) for sep in "-_:/. ")
    return first[: cut + 1]


def _pause_end(p: dict[str, Any], u: dict[str, Any], now: float) -> float:
    if p["resumed_s"] is not None:
        return p["resumed_s"]
    return u["ended_s"] if u["ended_s"] is not None else now


def _member_label(u: dict[str, Any], late: dict[str, str], prefix: str) -> str:
    n = len(prefix)
    ids = [m["request_id"][n:] + ("!" if m["request_id"] in late else "") for m in u["members"]]
    more = len(ids) - _LABELS
    return ",".join(ids[:_LABELS]) + (f" +{more}" if more > 0 else "")


# --------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flowprefill timeline",
        description="Why were requests late? Reads a saved scheduler timeline (timeline.json), "
        "prints the causes per SLO class and writes timeline.png next to it.",
    )
    parser.add_argument("source", help="a run directory holding timeline.json, or the JSON file")
    parser.add_argument("--out", help="PNG to write (default: timeline.png beside the JSON)")
    parser.add_argument("--list", type=int, default=20, help="missed requests to list (default 20)")
    args = parser.parse_args(argv)
    source = Path(args.source)
    json_path = source / "timeline.json" if source.is_dir() else source
    if not json_path.is_file():
        print(f"error: no timeline JSON at {json_path}", file=sys.stderr)
        return 2
    export = json.loads(json_path.read_text())
    verdicts = why_late(export)
    print(format_summary(summarize(export, verdicts)))
    if verdicts:
        print(f"\nmissed requests (first {min(args.list, len(verdicts))} of {len(verdicts)}):")
    for v in verdicts[: args.list]:
        print(
            f"  {v['request_id']:<16} {v['slo_class']:<8} ttft {v['ttft_s']:.3f}s "
            f"target {v['ttft_slo_s']:.3f}s late by {v['late_by_s']:.3f}s  {v['cause']}"
        )
    png = draw_gantt(
        export, Path(args.out) if args.out else json_path.with_name("timeline.png"), verdicts
    )
    print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
