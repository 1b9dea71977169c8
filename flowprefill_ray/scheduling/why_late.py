"""Why was this request late? One cause per missed request, from a timeline export.

Works on the JSON-able dict of ``Timeline.export`` (so on a saved ``timeline.json`` too).
A request *missed* when it finished and its TTFT - the client's when the runtime noted one
(``Timeline.note_client_ttft``), else the scheduler's (arrival to the completion of the unit
holding its last prompt token) - exceeds its target **in force** (after a ``Downgrade``, the
looser one). Rejected, cancelled and unfinished requests are counted, never attributed.

Notation: ``A`` arrival, ``T`` target, ``D = A + T`` deadline, ``P`` its own prefill predicted
on arrival, ``S`` when its first unit started, ``F`` the scheduler's first-token time.

**When it turned late** (``L``): the first instant at which, by the predictor, it could no
longer make ``D``: ``t + R(t) > D``, with ``R(t)`` its predicted remaining compute at ``t`` -
``P`` while queued (again after an eviction or a lost worker: progress is reset); inside unit
``u``, ``u``'s predicted compute minus what ``u`` has executed (``UnitPaused.executed_s``),
plus the predicted compute of its tokens after ``u`` (chunked prefill). While ``u`` runs the
predicted finish stays put until ``u`` outlives its prediction; after that it is late once
the clock passes ``D`` (minus the later chunks). ``L`` falls into one segment of its life:
``queued`` (before ``S``), ``run_start`` (its unit started already predicted to end past
``D``), ``overran`` (its unit ran past its prediction and then past ``D``), ``paused`` (its
unit paused), ``between_chunks``, ``requeued`` (after an eviction or a lost worker).

**The rules, checked in this order; the first that holds is the cause:**

1. ``serving_overhead``: the scheduler's TTFT ``F - A`` met ``T``; only the serving path
   (client TTFT minus scheduler TTFT: HTTP, the Serve replica, the hand-off) made it late.
2. ``infeasible_at_arrival``: ``P > T``: even started at once and alone it was predicted to
   miss.
3. ``paused_after_late``: after its first unit started, the time it spent not running -
   its unit paused, waiting between chunks, re-queued - *after* ``L`` is more than half of
   its scheduler lateness ``F - D``: most of its lateness is the policy deliberately putting
   a request that was already late behind feasible work (FlowPrefill demotes late requests).
4. ``overtaken_by_tighter``: ``L`` is in ``queued`` or ``requeued`` and by ``L`` a
   tighter-class arrival had been admitted ahead of it (``admission.overtake_looser``:
   ``Overtaken``). The policy chose the tighter class's deadline over its own.
5. ``preemption_latency``: ``L`` is in ``queued`` and at ``L`` it was waiting on a preemption
   decided for it at or before ``L`` whose victim had not stopped yet: the one whose paused
   worker its first unit took (``took_over``), or the one its own arrival asked for
   (``preempt_asked``; once it turned late FlowPrefill may give the worker back to the
   victim). Had the running unit stopped at once, it would have started in time; waiting for
   the victim to reach its next checkpoint made it late.
6. ``queued_behind_higher_ranked``: ``L`` is in ``queued``, ``paused``, ``between_chunks`` or
   ``requeued`` (it waited, while still feasible, for a worker busy with other work), or in
   ``run_start`` of a unit it ran alone (the prediction grew while it waited: the online
   correction rose).
7. ``batch_overran``: otherwise ``L`` is in ``overran`` (its unit's actual compute exceeded
   the prediction enough to carry it past ``D``) or in ``run_start`` of a batch (the batch it
   joined was predicted to end past its deadline).

``late_by_s`` is TTFT minus target. ``summarize`` sums causes per run and per SLO class (in
force); ``format_summary`` prints that table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

CAUSES = (
    "infeasible_at_arrival",
    "overtaken_by_tighter",
    "queued_behind_higher_ranked",
    "batch_overran",
    "paused_after_late",
    "preemption_latency",
    "serving_overhead",
)
# 1 ns: absorbs float error when a TTFT equals its target exactly (as the simulator does).
EPS = 1e-9
_WAITING = ("queued", "paused", "between_chunks", "requeued")


def missed(req: dict[str, Any]) -> bool:
    """Finished, and its TTFT (the client's if noted) exceeds its target in force."""
    ttft = _ttft(req)
    return ttft is not None and ttft > req["ttft_slo_s"] + EPS


def why_late(export: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per missed request of ``export``: ``request_id``, ``slo_class``, ``cause``
    (one of ``CAUSES``), ``late_by_s``, ``ttft_s``, ``scheduler_ttft_s``, ``ttft_slo_s``,
    ``turned_late_s`` (``L``, None for serving overhead), ``turned_late_in`` (the segment),
    ``waited_s`` (``S - A``) and ``stalled_after_late_s``."""
    units = {u["unit_id"]: u for u in export["units"]}
    now = export.get("now_s", 0.0)
    return [_verdict(r, units, now) for r in export["requests"] if missed(r)]


def _ttft(req: dict[str, Any]) -> float | None:
    if req["status"] != "finished" or req["first_token_s"] is None:
        return None
    client = req.get("client_ttft_s")
    return client if client is not None else req["first_token_s"] - req["arrival_s"]


def _verdict(req: dict[str, Any], units: dict[int, Any], now: float) -> dict[str, Any]:
    arrival, target = req["arrival_s"], req["ttft_slo_s"]
    deadline, first = arrival + target, req["first_token_s"]
    ttft = _ttft(req)
    assert ttft is not None
    verdict: dict[str, Any] = {
        "request_id": req["request_id"],
        "slo_class": req["slo_class"],
        "ttft_s": ttft,
        "scheduler_ttft_s": first - arrival,
        "ttft_slo_s": target,
        "late_by_s": ttft - target,
        "turned_late_s": None,
        "turned_late_in": None,
        "waited_s": (first if req["first_start_s"] is None else req["first_start_s"]) - arrival,
        "stalled_after_late_s": 0.0,
    }
    if first - arrival <= target + EPS:
        return {**verdict, "cause": "serving_overhead"}
    if req["predicted_s"] > target + EPS:
        return {**verdict, "cause": "infeasible_at_arrival", "turned_late_s": arrival}
    segments = list(_segments(req, units, now))
    turned, kind, index = _turned_late(segments, deadline, first)
    stalled = sum(
        max(0.0, min(t1, first) - max(t0, turned))
        for k, t0, t1, *_ in segments[1:]  # segment 0 is the wait before its first unit
        if k in _WAITING
    )
    verdict.update(turned_late_s=turned, turned_late_in=kind, stalled_after_late_s=stalled)
    if stalled > (first - deadline) / 2:
        cause = "paused_after_late"
    elif kind in ("queued", "requeued") and any(
        o["at_s"] <= turned + EPS for o in req.get("overtaken", ())
    ):
        cause = "overtaken_by_tighter"
    elif kind == "queued":
        waited_on_a_stop = _waiting_on_preemption(req, units, segments[0][5], turned)
        cause = "preemption_latency" if waited_on_a_stop else "queued_behind_higher_ranked"
    elif kind in _WAITING:
        cause = "queued_behind_higher_ranked"
    elif kind == "run_start" and len(units[segments[index][5]]["members"]) == 1:
        cause = "queued_behind_higher_ranked"
    else:
        cause = "batch_overran"
    return {**verdict, "cause": cause}


def _waiting_on_preemption(
    req: dict[str, Any], units: dict[int, Any], first_unit: int, turned: float
) -> bool:
    """At ``turned`` (``L``, while queued), a preemption decided for this request by then was
    still waiting for its victim to stop: the one whose paused worker its first unit took, or
    the one its own arrival asked for (the worker may have gone back to the victim once the
    request had turned late)."""
    took = units[first_unit].get("took_over")
    if took is not None and took["preempt_s"] is not None and took["preempt_s"] <= turned + EPS:
        return True  # its unit started when that pause came, after L
    asked = req.get("preempt_asked")
    if asked is None or asked["at_s"] > turned + EPS:
        return False
    victim = units.get(asked["unit_id"])
    if victim is None:
        return True  # not exported: assume it had not stopped yet
    stops = [p["paused_s"] for p in victim["pauses"] if p["paused_s"] >= asked["at_s"]]
    stopped = stops[0] if stops else victim["ended_s"]
    return stopped is None or stopped > turned


def _segments(req: dict[str, Any], units: dict[int, Any], now: float) -> Iterator[tuple]:
    """``(kind, t0, t1, remaining_s, after_s, unit_id)`` pieces of the request's life, in
    order. For waiting kinds ``remaining_s`` is its whole predicted remaining compute; for a
    ``run`` it is the unit's remaining prediction at ``t0`` and ``after_s`` its later chunks."""
    t, remaining, kind = req["arrival_s"], req["predicted_s"], "queued"
    for stage in req["units"]:
        u = units[stage["unit_id"]]
        yield kind, t, u["started_s"], remaining, 0.0, u["unit_id"]
        after, executed = stage["rest_predicted_s"], 0.0
        runs, pauses = u["runs"], u["pauses"]
        for i, (r0, r1) in enumerate(runs):
            r1 = now if r1 is None else r1
            yield "run", r0, r1, max(u["predicted_s"] - executed, 0.0), after, u["unit_id"]
            if i < len(pauses):
                p = pauses[i]
                executed = p["executed_s"]
                end = p["resumed_s"] if p["resumed_s"] is not None else (u["ended_s"] or now)
                left = max(u["predicted_s"] - executed, 0.0) + after
                yield "paused", r1, end, left, 0.0, u["unit_id"]
        t = u["ended_s"] if u["ended_s"] is not None else now
        if u["outcome"] == "completed":
            remaining, kind = after, "between_chunks"
        else:  # discarded or lost: recomputed from token 0
            remaining, kind = req["predicted_s"], "requeued"


def _turned_late(segments: list[tuple], deadline: float, first: float) -> tuple[float, str, int]:
    """``(L, segment kind, segment index)``: see the module docstring."""
    for i, (kind, t0, t1, remaining, after, _) in enumerate(segments):
        if kind == "run":
            if t0 + remaining + after > deadline + EPS:
                return t0, "run_start", i
            late_at = deadline - after  # once its unit outlives the prediction
            if late_at < t1:
                return max(late_at, t0), "overran", i
        else:
            if t0 + remaining > deadline + EPS:
                return t0, kind, i
            if deadline - remaining < t1:
                return deadline - remaining, kind, i
    # Not reached for a request that finished after D; kept total for odd inputs.
    return min(deadline, first), segments[-1][0] if segments else "queued", len(segments) - 1


# --------------------------------------------------------------------------- tables


def summarize(export: dict[str, Any], verdicts: Iterable[dict[str, Any]] | None = None) -> dict:
    """Causes summed over the run and per SLO class (in force): ``{"classes": [...],
    "rows": {"all": {...}, "<class>": {...}}}``, each row counting ``requests``,
    ``finished``, ``missed``, ``rejected``, ``cancelled``, ``unfinished`` and every cause."""
    verdicts = why_late(export) if verdicts is None else list(verdicts)
    keys = ("requests", "finished", "missed", "rejected", "cancelled", "unfinished", *CAUSES)
    rows: dict[str, dict[str, int]] = {"all": dict.fromkeys(keys, 0)}
    for r in export["requests"]:
        status = r["status"] if r["status"] in ("finished", "rejected", "cancelled") else None
        for name in ("all", r["slo_class"]):
            row = rows.setdefault(name, dict.fromkeys(keys, 0))
            row["requests"] += 1
            row[status or "unfinished"] += 1
    for v in verdicts:
        for name in ("all", v["slo_class"]):
            rows[name]["missed"] += 1
            rows[name][v["cause"]] += 1
    classes = sorted(k for k in rows if k != "all")
    return {"classes": classes, "rows": rows}


def format_summary(summary: dict) -> str:
    """The ``summarize`` table as text: one line per count, one column per class."""
    columns = ["all", *summary["classes"]]
    names = list(summary["rows"]["all"])
    width = max(len(n) for n in names)

    def line(label: str, values: list) -> str:
        cells = (f"{v:>{max(len(c), 6)}}" for v, c in zip(values, columns, strict=True))
        return f"{label:<{width}}  " + "  ".join(cells)

    lines = [line("", columns)]
    lines += [line(name, [summary["rows"][c][name] for c in columns]) for name in names]
    return "\n".join(lines)
