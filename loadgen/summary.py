"""Aggregates of a run: latency percentiles and TTFT SLO attainment, overall and per class.

Attainment is over requests *sent*: a request that failed, was rejected (HTTP 429) or never got
a first token counts as a miss, so overload cannot raise attainment by failing requests.
``goodput_rps`` here is the request rate times the share of all sent requests that met their
SLO (SLO-meeting requests per second, never above the request rate); the DistServe goodput
(the highest rate at which >= 90 % meet the SLO) is a search over runs (``loadgen.goodput``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .result import RequestResult
from .runner import RunResult
from .stats import distribution
from .ttft_path import ttft_path


def _group_stats(
    records: Sequence[RequestResult], rate_rps: float | None, sent: int
) -> dict[str, Any]:
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    tpots = [r.tpot_s for r in records if r.tpot_s is not None]
    e2es = [r.e2e_s for r in records if r.e2e_s is not None]
    itls = [gap for r in records if r.status == "ok" for gap in r.itl_s]
    met = sum(r.slo_met for r in records)
    preemptions = [r.preemptions for r in records if r.preemptions is not None]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "requests": len(records),
        "slo_met": met,
        "attainment": met / len(records) if records else None,
        "goodput_rps": rate_rps * met / sent if rate_rps is not None and sent else None,
        "status": statuses,
        "ttft_s": distribution(ttfts),
        "tpot_s": distribution(tpots),
        "itl_s": distribution(itls),
        "e2e_s": distribution(e2es),
        "output_tokens": sum(r.output_tokens for r in records),
        "preemptions": sum(preemptions) if preemptions else None,
        "preempted_requests": sum(1 for p in preemptions if p > 0) if preemptions else None,
    }


def sending_window_s(records: Iterable[RequestResult]) -> float:
    """Seconds from the first to the last send (at least 1 s, so a tiny run has a rate)."""
    sent = [r.sent_s for r in records if r.sent_s is not None]
    if not sent:
        return 0.0
    return max(1.0, max(sent) - min(sent))


def summarize(result: RunResult) -> dict[str, Any]:
    """The run's summary: overall and per-class stats, request rate and open-loop send lag."""
    sent = result.sent
    window = sending_window_s(sent)
    # Arrival rate over the sending window: n requests span n - 1 gaps.
    rate = (len(sent) - 1) / window if len(sent) > 1 and window > 0 else None
    lags = [r.send_lag_s for r in sent if r.send_lag_s is not None]
    classes = sorted({r.slo_class for r in sent})
    n = len(sent)
    return {
        "trace": result.replay.trace,
        "rate_scale": result.replay.rate_scale,
        "planned": len(result.records),
        "sent": n,
        "wall_s": result.wall_s,
        "request_rate_rps": rate,
        "max_send_lag_s": max(lags) if lags else None,
        "overall": _group_stats(sent, rate, n),
        "per_class": {
            c: _group_stats([r for r in sent if r.slo_class == c], rate, n) for c in classes
        },
        "ttft_slo_s": {c: next(r.ttft_slo_s for r in sent if r.slo_class == c) for c in classes},
        # Our server only (it returns per-hop stamps): where the client's TTFT went.
        "ttft_path": ttft_path(sent),
    }


def format_report(summary: dict[str, Any]) -> str:
    """A compact human table: one line per SLO class plus the total."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    lines = [
        f"{'class':<8} {'slo_ms':>7} {'n':>5} {'ttft_p50':>9} {'ttft_p99':>9} "
        f"{'tpot_p50':>9} {'attain':>7} {'preempt':>7}"
    ]
    rows = list(summary["per_class"].items()) + [("ALL", summary["overall"])]
    for name, stats in rows:
        slo = summary["ttft_slo_s"].get(name)
        preempt = stats["preemptions"]
        lines.append(
            f"{name:<8} {ms(slo):>7} {stats['requests']:>5} {ms(stats['ttft_s']['p50']):>9} "
            f"{ms(stats['ttft_s']['p99']):>9} {ms(stats['tpot_s']['p50']):>9} "
            f"{pct(stats['attainment']):>7} {'-' if preempt is None else preempt:>7}"
        )
    rate = summary["request_rate_rps"]
    lines.append(
        f"sent {summary['sent']}/{summary['planned']} at {rate if rate is None else round(rate, 2)} req/s, "
        f"goodput {summary['overall']['goodput_rps'] or 0:.2f} SLO-meeting req/s, "
        f"status {summary['overall']['status']}, max send lag {ms(summary['max_send_lag_s'])} ms"
    )
    return "\n".join(lines)
