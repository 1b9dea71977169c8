"""PNG plots of replays: attainment against request rate, TTFT CDF per class, one burst's timeline.

matplotlib is imported inside each function with the non-interactive Agg backend, so importing
this module costs nothing and plots render on machines without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .result import RequestResult

# One colour per SLO class, tightest first, stable across plots.
_CLASS_COLOURS = {
    "text": "tab:red",
    "image": "tab:orange",
    "search": "tab:blue",
    "file": "tab:green",
}
_PHASE_COLOURS = {"queue": "0.75", "prefill": "tab:purple", "decode": "tab:cyan"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _class_colour(name: str, index: int) -> str:
    return _CLASS_COLOURS.get(name, f"C{index % 10}")


def plot_attainment_vs_rate(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    target: float = 0.9,
    title: str = "TTFT SLO attainment vs request rate",
) -> Path:
    """One line per policy through its (request rate in req/s, attainment 0..1) points, with
    the goodput target as a dashed line. Returns the PNG path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (policy, points) in enumerate(series.items()):
        pts = sorted(points)
        ax.plot(
            [p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=policy, color=f"C{i}"
        )
    ax.axhline(target * 100, color="0.4", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("TTFT SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_ttft_cdf(
    records: Sequence[RequestResult], path: str | Path, title: str = "TTFT CDF per SLO class"
) -> Path:
    """Empirical TTFT CDF per SLO class, with each class's target as a dotted vertical line.
    Requests without a first token are left out of the curve but lower its top (the CDF of a
    class whose requests all answered reaches 100 %)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    classes = sorted({r.slo_class for r in records if r.status != "not_sent"}, key=_class_order)
    for i, name in enumerate(classes):
        group = [r for r in records if r.slo_class == name and r.status != "not_sent"]
        ttfts = sorted(r.ttft_s for r in group if r.ttft_s is not None)
        colour = _class_colour(name, i)
        if ttfts:
            ys = [(k + 1) / len(group) * 100 for k in range(len(ttfts))]
            ax.step(ttfts, ys, where="post", color=colour, label=f"{name} (n={len(group)})")
        ax.axvline(group[0].ttft_slo_s, color=colour, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log scale); dotted: class target")
    ax.set_ylabel("requests (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def busiest_window(records: Sequence[RequestResult], width_s: float) -> tuple[float, float]:
    """The ``width_s``-second window (start, end) in which the most requests were sent."""
    sends = sorted(r.sent_s for r in records if r.sent_s is not None)
    if not sends:
        return (0.0, width_s)
    best_start, best_count, j = sends[0], 0, 0
    for i, start in enumerate(sends):
        while j < len(sends) and sends[j] < start + width_s:
            j += 1
        if j - i > best_count:
            best_start, best_count = start, j - i
    return (best_start, best_start + width_s)


def plot_burst_timeline(
    records: Sequence[RequestResult],
    path: str | Path,
    window_s: float = 5.0,
    max_requests: int = 40,
    title: str | None = None,
) -> Path:
    """Per-request bars for the busiest ``window_s`` seconds of sends: queue (server-reported
    queue time, when the server reports it), prefill (until the first token), decode (until
    the stream ended). A red ``x`` with a count marks a request the server preempted; a black
    tick marks its TTFT deadline (an arrow at the right edge when it lies beyond the axis)."""
    plt = _pyplot()
    start, end = busiest_window(records, window_s)
    chosen = [r for r in records if r.sent_s is not None and start <= r.sent_s < end][:max_requests]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(chosen) + 1.2)))
    labels = []
    deadlines: list[tuple[int, float]] = []
    for y, r in enumerate(chosen):
        labels.append(f"{r.request_id} {r.slo_class} {r.prompt_tokens}t")
        sent = r.sent_s - start
        first = None if r.first_token_s is None else r.first_token_s - start
        finish = None if r.end_s is None else r.end_s - start
        wait_end = first if first is not None else finish
        queue = r.server.get("queue_s")
        if wait_end is not None:
            queue_end = (
                sent + min(float(queue), wait_end - sent)
                if isinstance(queue, (int, float))
                else sent
            )
            if queue_end > sent:
                ax.barh(y, queue_end - sent, left=sent, color=_PHASE_COLOURS["queue"], height=0.6)
            ax.barh(
                y, wait_end - queue_end, left=queue_end, color=_PHASE_COLOURS["prefill"], height=0.6
            )
        if first is not None and finish is not None and finish > first:
            ax.barh(y, finish - first, left=first, color=_PHASE_COLOURS["decode"], height=0.6)
        deadlines.append((y, sent + r.ttft_slo_s))
        if r.preemptions:
            x = first if first is not None else sent
            ax.plot([x], [y], marker="x", color="red", markersize=8)
            ax.annotate(
                f"{r.preemptions}",
                (x, y),
                xytext=(4, 3),
                textcoords="offset points",
                color="red",
                fontsize=7,
            )
    # Loose classes' deadlines lie far beyond the bars; the axis follows the bars and a
    # deadline past its right edge is drawn there as an arrow.
    ends = [(r.end_s if r.end_s is not None else r.sent_s) - start for r in chosen]
    right = max(ends + [window_s]) * 1.08
    for y, deadline in deadlines:
        inside = deadline <= right
        ax.plot(
            [min(deadline, right)],
            [y],
            marker="|" if inside else ">",
            color="black",
            markersize=10 if inside else 6,
            clip_on=False,
        )
    ax.set_xlim(0, right)
    ax.set_yticks(range(len(chosen)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds from {start:.1f} s into the run")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _PHASE_COLOURS.values()]
    handles += [
        plt.Line2D([], [], marker="x", color="red", linestyle=""),
        plt.Line2D([], [], marker="|", color="black", linestyle=""),
    ]
    ax.legend(
        handles,
        ["queue", "prefill", "decode", "preempted (count)", "TTFT deadline"],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_title(title or f"busiest {window_s:g} s of the replay ({len(chosen)} requests)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _class_order(name: str) -> tuple[int, str]:
    order = list(_CLASS_COLOURS)
    return (order.index(name) if name in order else len(order), name)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
