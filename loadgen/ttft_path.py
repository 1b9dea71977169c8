"""Where each request's TTFT went, hop by hop, on the host's wall clock (our server only).

Our server returns the wall-clock stamps of every hop of a request's first-token path
(``flowprefill.hops``: ``flowprefill_ray.request_clock.HOPS``); the client adds its own around
them: sending (``RequestResult.sent_wall_s``) and the first token arriving (sending plus the
client's TTFT). Client and server must share one host for the stamps to compare (otherwise the
segments include clock skew). Servers that return no hops (vLLM, SGLang) get no breakdown.

Three stages split the client's TTFT exactly:

- ``to_scheduler``: sending to the scheduler's ``submit`` (client, Serve proxy, ingress,
  tokenizing, the engine's call);
- ``in_scheduler``: the scheduler's own TTFT (queueing, prefill, pauses, the worker's reply);
- ``from_scheduler``: the first token's way back (hand-off, engine, ingress, proxy, client).

``segments`` splits the same time between every pair of consecutive stamps. Means add up
(their sum is the mean TTFT of the requests that passed every hop); percentiles do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowprefill_ray.request_clock import (
    CLIENT_PATH,
    CLIENT_RECEIVED,
    CLIENT_SENT,
    hop_segments,
)

from .result import RequestResult
from .stats import distribution

STAGES = {
    "to_scheduler": (CLIENT_SENT, "scheduler_arrival"),
    "in_scheduler": ("scheduler_arrival", "scheduler_first_token"),
    "from_scheduler": ("scheduler_first_token", CLIENT_RECEIVED),
}


def request_hops(record: RequestResult) -> dict[str, float] | None:
    """The request's server hops between the client's two stamps, in path order; None when
    the server sent no hops or the request got no first token."""
    hops = record.server.get("hops")
    ttft = record.ttft_s
    if not isinstance(hops, dict) or not hops or record.sent_wall_s is None or ttft is None:
        return None
    stamps = {CLIENT_SENT: record.sent_wall_s, **hops, CLIENT_RECEIVED: record.sent_wall_s + ttft}
    return {hop: stamps[hop] for hop in CLIENT_PATH if hop in stamps}


def _group(paths: Sequence[dict[str, float]]) -> dict[str, Any]:
    stages = {
        name: distribution([p[b] - p[a] for p in paths if a in p and b in p])
        for name, (a, b) in STAGES.items()
    }
    gaps: dict[str, list[float]] = {}
    for path in paths:
        for name, gap in hop_segments(path).items():
            gaps.setdefault(name, []).append(gap)
    return {
        "requests": len(paths),
        "ttft_s": distribution([p[CLIENT_RECEIVED] - p[CLIENT_SENT] for p in paths]),
        "stages_s": stages,
        "segments_s": {name: distribution(values) for name, values in gaps.items()},
    }


def ttft_path(records: Sequence[RequestResult]) -> dict[str, Any] | None:
    """Overall and per SLO class: the client's TTFT, its three stages and every hop segment
    (p50/p90/p99/mean seconds) over the requests that carry hops; None when none does."""
    paths = [(r.slo_class, request_hops(r)) for r in records]
    with_hops = [(c, p) for c, p in paths if p is not None]
    if not with_hops:
        return None
    classes = sorted({c for c, _ in with_hops})
    return {
        "overall": _group([p for _, p in with_hops]),
        "per_class": {c: _group([p for k, p in with_hops if k == c]) for c in classes},
    }
