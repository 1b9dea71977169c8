"""The docs' tables of live measurements (runtime, Serve app, soak), each rendered from its
committed JSON in ``docs/results``; registered in ``result_tables.TABLES`` like the
simulator's tables, and found by ``scripts/benchmark_tables.py`` through the same markers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from result_tables import pct, rows, spread, table

# ------------------------------------------------------------------------ prefix_ttft.json


@table("prefix_ttft", "prefix_ttft.json")
def prefix_ttft(report: dict[str, Any]) -> str:
    args, median, runs = report["args"], report["median_ttft_s"], report["ttft_s"]
    cases = [
        (f"repeat of a {args['prompt_tokens']:,}-token prompt", "cold", "repeat", "repeat"),
        (
            f"the same prompt + {args['extension_tokens']} tokens",
            "ext_cold",
            "ext_warm",
            "extension",
        ),
    ]
    body = []
    for label, cold, warm, ratio in cases:
        body.append(
            [
                label,
                f"{median[cold] * 1000:,.0f} ms",
                f"{median[warm] * 1000:,.0f} ms",
                pct(report["ratios"][ratio]),
                f"<= {pct(report['targets'][ratio])}",
                f"{spread([t * 1000 for t in runs[cold]], ',.0f')} ms",
                f"{spread([t * 1000 for t in runs[warm]], ',.0f')} ms",
            ]
        )
    header = ["case", "cold TTFT", "warm TTFT", "warm / cold", "target"]
    header += [f"cold, min-max of {args['repeats']}", f"warm, min-max of {args['repeats']}"]
    return rows(header, body)


# ----------------------------------------------------------------- preemption_latency.json

HANDOVERS = {
    "one_hop": ("`one_hop` (default)", "sent together"),
    "after_pause": ("`after_pause`", "in sequence"),
}


@table("preemption_latency", "preemption_latency.json")
def preemption_latency(report: dict[str, Any]) -> str:
    body = []
    for mode, result in report["modes"].items():
        label, calls = HANDOVERS[mode]
        e2e, block = result["end_to_end_ms"], result["block_ms"]
        gap = f"{report['mean_end_to_end_minus_block_ms'][mode]:.1f} ms"
        body.append(
            [
                label,
                f"{e2e['p50']:.1f} / {e2e['p90']:.1f} / {e2e['p99']:.1f} ms",
                f"{block['p50']:.1f} / {block['p90']:.1f} / {block['p99']:.1f} ms",
                f"**{gap}**" if mode == "one_hop" else gap,
                f"{result['ray_calls_per_preemption']}, {calls}",
            ]
        )
    header = ["handover", "end to end p50 / p90 / p99", "block p50 / p90 / p99"]
    header += ["mean (end to end - block)", "calls after the decision"]
    return rows(header, body)


# ------------------------------------------------------------------- request_overhead.json


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@table("request_overhead", "request_overhead.json")
def request_overhead(report: dict[str, Any]) -> str:
    keys = ["ttft_p50_s", "ttft_p90_s", "prefill_p50_s", "overhead_p50_s", "overhead_p90_s"]
    keys += ["worker_excess_p50_s", "worker_excess_p90_s"]
    body = [[r["shape"], r["tokens"], *(ms(r[k]) for k in keys)] for r in report["rows"]]
    header = ["shape", "tokens", "TTFT p50", "TTFT p90", "prefill p50", "overhead p50"]
    header += ["overhead p90", "worker - prefill p50", "p90"]
    return rows(header, body)


def hop_label(name: str) -> str:
    """A hop into the engine's first token comes from the scheduler, or from the decode
    hand-off when decoding follows: one row for both."""
    start, end = name.split("->")
    if end == "engine_first_token":
        return "scheduler_first_token or decode_handoff -> engine_first_token"
    return f"{start} -> {end}"


def labelled_hops(row: dict[str, Any]) -> dict[str, float]:
    """A request_overhead row's p50 per hop, under ``hop_label``'s names."""
    return {hop_label(n): v for n, v in row["hops_p50_s"].items()}


@table("request_overhead_hops", "request_overhead.json")
def request_overhead_hops(report: dict[str, Any]) -> str:
    # Path order: the rows with the most hops (streamed: the decode hand-off) first.
    by_hops = sorted(report["rows"], key=lambda r: -len(r["hops_p50_s"]))
    labels = list(dict.fromkeys(hop_label(n) for r in by_hops for n in r["hops_p50_s"]))
    body = []
    for label in labels:
        cells = []
        for r in report["rows"]:
            hops = labelled_hops(r)
            cells.append(ms(hops[label]) if label in hops else "-")
        body.append([label, *cells])
    header = [
        "hop (p50 ms, committed run)",
        *(f"{r['shape']} {r['tokens']}" for r in report["rows"]),
    ]
    return rows(header, body)


@table(
    "request_overhead_serve_flags",
    "request_overhead_ab_default.json",
    "request_overhead_ab_throughput_optimized.json",
)
def request_overhead_serve_flags(default: dict[str, Any], optimized: dict[str, Any]) -> str:
    """p50 per hop, Ray Serve's defaults -> its throughput-optimized switches, two back-to-back
    runs; the path outside the worker summed (TTFT minus the worker's compute)."""
    body = []
    pairs = list(zip(default["rows"], optimized["rows"], strict=True))
    labels = list(dict.fromkeys(hop_label(n) for r, _ in pairs for n in r["hops_p50_s"]))
    for label in labels:
        cells = []
        for a, b in pairs:
            ha, hb = labelled_hops(a), labelled_hops(b)
            cells.append(f"{ms(ha[label])} -> {ms(hb[label])}" if label in ha else "-")
        body.append([label, *cells])
    outside = []
    for a, b in pairs:
        a_out = sum(v for n, v in a["hops_p50_s"].items() if n != "worker_start->worker_end")
        b_out = sum(v for n, v in b["hops_p50_s"].items() if n != "worker_start->worker_end")
        outside.append(f"{ms(a_out)} -> {ms(b_out)}")
    body.append(["sum of the hops outside the worker", *outside])
    header = ["hop (p50 ms, default -> optimized)"]
    header += [f"{a['shape']} {a['tokens']}" for a, _ in pairs]
    return rows(header, body)


# ------------------------------------------------------------------------- why_late.json

CAUSES = (
    "serving_overhead",
    "infeasible_at_arrival",
    "paused_after_late",
    "overtaken_by_tighter",
    "preemption_latency",
    "queued_behind_higher_ranked",
    "batch_overran",
)


def misses(counts: dict[str, int]) -> str:
    """``0``, ``19, all `paused_after_late```, or ``2: 1 `a`, 1 `b```."""
    causes = {c: counts[c] for c in CAUSES if counts.get(c)}
    if not counts["missed"]:
        return "0"
    if len(causes) == 1:
        return f"{counts['missed']}, all `{next(iter(causes))}`"
    return f"{counts['missed']}: " + ", ".join(f"{n} `{c}`" for c, n in causes.items())


def class_cells(run: dict[str, Any], classes: tuple[str, ...]) -> dict[str, list[str]]:
    """Per-class cells of one run; a tenant the run did not send (a one-tenant run) is "-"."""
    per_class, why = run["per_class"], run["why_late"]["rows"]

    def each(cell: Callable[[str], str]) -> list[str]:
        return [cell(c) if c in per_class else "-" for c in classes]

    return {
        "attainment (after warm-up)": each(lambda c: f"{per_class[c]['attainment']:.3f}"),
        "refused (429)": each(lambda c: str(per_class[c]["rejected"])),
        "missed after admission": each(lambda c: misses(why[c])),
        "TTFT p99": each(lambda c: f"{per_class[c]['ttft_p99_s']:.1f} s"),
    }


@table("why_late_before", "why_late.json")
def why_late_before(report: dict[str, Any]) -> str:
    classes = ("urgent", "relaxed")
    cells = class_cells(report["runs"]["before"], classes)
    return rows(["", *classes], [[name, *values] for name, values in cells.items()])


@table("why_late_runs", "why_late.json")
def why_late_runs(report: dict[str, Any]) -> str:
    classes = ("urgent", "relaxed")
    body = []
    for key, run in report["runs"].items():
        cells = class_cells(run, classes)
        offered = run["offered"]
        body.append(
            [
                f"`{key}`",
                run["commit"][:7],
                f"{offered['requests']:,} at {offered['rate_rps']:.2f} req/s",
                f"{run['attainment']:.3f}",
                *(" / ".join(v) for v in cells.values()),
                "yes" if run["stable"] else "**no**",
            ]
        )
    header = ["run", "commit", "requests offered", "attainment"]
    header += [f"{name}, urgent / relaxed" for name in cells] + ["stable"]
    return rows(header, body)


# ------------------------------------------------------------------ overload_3x_*.json

OVERLOAD_RUNS = {
    "before": "queue estimate, no headroom, no unit-overhead term (`--headroom 0 --no-unit-overhead`)",
    "overhead": "+ per-unit overhead learned (`--headroom 0`)",
    "shipped": "shipped (+ headroom 0.05)",
}


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The percentile as ``benchmarks/soak.py`` prints it."""
    if q == 0.5:
        return sorted_values[len(sorted_values) // 2]
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def why_late_summary(counts: dict[str, int]) -> str:
    """``42: 38 queued behind higher-ranked, 4 serving overhead`` (most frequent first)."""
    causes = sorted((c for c in CAUSES if counts.get(c)), key=lambda c: -counts[c])
    named = ", ".join(
        f"{counts[c]} {c.replace('_', ' ').replace('higher ', 'higher-')}" for c in causes
    )
    return f"{counts['missed']}: {named}"


@table(
    "overload_3x",
    "overload_3x_before.json",
    "overload_3x_overhead.json",
    "overload_3x_shipped.json",
)
def overload_3x(*runs: dict[str, Any]) -> str:
    body = []
    for label, run in zip(OVERLOAD_RUNS.values(), runs, strict=True):
        per_class, refusals = run["per_class"], run["reject_s"]
        body.append(
            [
                label,
                # Each run measures its own capacity first, so the rates differ between runs.
                f"{run['rate_rps']:.1f} req/s ({run['prefill_service_s'] * 1000:.0f} ms)",
                " / ".join(f"{per_class[c]['attainment']:.3f}" for c in ("relaxed", "urgent")),
                " / ".join(f"{per_class[c]['ttft_p99_s']:.1f} s" for c in ("relaxed", "urgent")),
                why_late_summary(run["why_late"]["rows"]["all"]),
                " / ".join(f"{nearest_rank(refusals, q) * 1000:.1f}" for q in (0.5, 0.99)) + " ms",
            ]
        )
    header = ["run", "offered: 3x capacity (service time)", "admitted on time, relaxed / urgent"]
    header += ["TTFT p99 relaxed / urgent"]
    header += ["misses (why-late)", "429 decided p50 / p99"]
    return rows(header, body)


# --------------------------------------------------------------------- soak_60min.json

ACTORS = ("Scheduler", "PrefillWorker", "DecodeWorker")


@table("soak_60min_rss", "soak_60min.json")
def soak_60min_rss(report: dict[str, Any]) -> str:
    window_s = 600.0
    windows = int(report["duration_s"] // window_s)
    samples = report["samples"]
    body = []
    for actor in ACTORS:
        cells = []
        for w in range(windows):
            # The last window keeps the sample taken at the very end of the run.
            hi = float("inf") if w == windows - 1 else (w + 1) * window_s
            values = [
                s["actors_rss_by_kind_mib"][actor]
                for s in samples
                if w * window_s <= s["at_s"] < hi and actor in s["actors_rss_by_kind_mib"]
            ]
            cells.append(f"{statistics.median(values):.1f}")
        peak = max(s["actors_rss_by_kind_mib"].get(actor, 0.0) for s in samples)
        body.append([actor, *cells, f"{peak:.1f}"])
    minutes = [f"{w * 10}-{(w + 1) * 10}" for w in range(windows)]
    minutes[0] += " min"
    return rows(["actor", *minutes, "max"], body)


# ------------------------------------------------------ prefix_goodput_multiturn.json


def refused(trials: list[dict[str, Any]]) -> str:
    """The requests each trial's server refused (429), "-" for vLLM: it has no admission
    control, so it refuses nothing."""
    return " / ".join(
        str(t["server_counts"]["rejected"]) if "server_counts" in t else "-" for t in trials
    )


@table("prefix_goodput", "prefix_goodput_multiturn.json")
def prefix_goodput(report: dict[str, Any]) -> str:
    """Per grid rate and system: attainment of each repeat, the prefill the cache served,
    steady TTFT p50 / p90 (medians of the repeats) and requests refused."""
    body = []
    for rate in report["rates_rps"]:
        for name, system in report["systems"].items():
            trials = [t for t in system["trials"] if t["rate_rps"] == rate]
            served = [
                t["server_counts"]["prefix_cache_hit_tokens"]
                / (t["prompt_tokens_mean"] * t["sent"])
                for t in trials
            ]
            body.append(
                [
                    f"{rate:.2f} req/s",
                    f"`{name}`",
                    " / ".join(f"{t['attainment']:.3f}" for t in trials),
                    " / ".join(pct(s) for s in served),
                    f"{statistics.median(t['ttft_s']['p50'] for t in trials) * 1000:,.0f} ms",
                    f"{statistics.median(t['ttft_s']['p90'] for t in trials) * 1000:,.0f} ms",
                    refused(trials),
                ]
            )
    header = ["rate", "system", "attainment (repeats)", "prompt tokens from the cache"]
    header += ["TTFT p50", "TTFT p90", "refused (429)"]
    return rows(header, body)


# The cached app alone, further up the same unit of rate (a later run, nice-0 front end).
table("prefix_goodput_high", "prefix_goodput_multiturn_high.json")(prefix_goodput)


# ------------------------------------------------------------------ peer_overtake.json


@table("peer_overtake", "peer_overtake.json")
def peer_overtake(report: dict[str, Any]) -> str:
    """Per grid rate and system: attainment of each session, each class's attainment (mean of
    the sessions, classes tightest first) and requests refused."""
    classes = sorted(report["slo_targets_s"], key=report["slo_targets_s"].get)
    body = []
    for rate in report["rates_rps"]:
        for name, system in report["systems"].items():
            trials = [t for t in system["trials"] if t["rate_rps"] == rate]
            body.append(
                [
                    f"{rate:.3f} req/s",
                    f"`{name}`",
                    " / ".join(
                        f"{t['attainment']:.3f}" + ("" if t["stable"] else " (unstable)")
                        for t in trials
                    ),
                    *(
                        f"{statistics.mean(t['per_class'][c]['attainment'] for t in trials):.3f}"
                        for c in classes
                    ),
                    refused(trials),
                ]
            )
    header = ["rate", "system", "attainment (sessions)"]
    header += [f"{c} ({report['slo_targets_s'][c]:g} s)" for c in classes]
    return rows(header + ["refused (429)"], body)


# --------------------------------------------------- ttft_path_front_end_nice*.json

FRONT_END_RUNS = (
    "ttft_path_front_end_nice15.json",
    "ttft_path_front_end_nice0.json",
    "ttft_path_front_end_nice0_run2.json",
    "ttft_path_front_end_nice15_run2.json",
)


@table("front_end_niceness", *FRONT_END_RUNS)
def front_end_niceness(*reports: dict[str, Any]) -> str:
    """One row per session, in the order they ran: attainment, the tight classes, and the
    hops before and after the scheduler (p50 / p90 of the steady requests)."""
    body = []
    for source, report in zip(FRONT_END_RUNS, reports, strict=True):
        session = report["systems"]["flowprefill"]["sessions"][0]
        trial = report["systems"]["flowprefill"]["trials"][0]
        stages = trial["ttft_path"]["overall"]["stages_s"]
        classes = trial["per_class"]
        body.append(
            [
                f"nice {session['front_end_niceness']}",
                f"`{source}`",
                report["commit"][:7],
                f"{report['machine']['load_avg_before'][0]:.1f}",
                f"{trial['attainment']:.3f}",
                f"{classes['text']['attainment']:.3f}",
                f"{classes['image']['attainment']:.3f}",
                *(
                    f"{stages[s]['p50'] * 1000:.0f} / {stages[s]['p90'] * 1000:.0f} ms"
                    for s in ("to_scheduler", "from_scheduler")
                ),
                f"{trial['ttft_s']['p50']:.2f} s",
            ]
        )
    header = ["front end", "raw", "commit", "load before", "attainment", "text (1 s)"]
    header += ["image (2 s)", "`to_scheduler` p50 / p90", "`from_scheduler` p50 / p90"]
    return rows([*header, "TTFT p50"], body)
