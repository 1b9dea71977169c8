"""The result tables of the docs, each rendered from its committed JSON in ``docs/results``.

One function per table, registered under the name the docs' markers use
(``scripts/benchmark_tables.py`` finds the markers and rewrites what lies between them). A
function takes the loaded JSON of its sources, in the order they are registered, and returns
the markdown that belongs between the markers. Numbers are formatted as the docs wrote them
by hand before; nothing here is typed in: every figure comes from the JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RESULTS = "docs/results"


@dataclass(frozen=True)
class TableSpec:
    name: str
    sources: tuple[str, ...]  # paths from the repository root
    render: Callable[..., str]


TABLES: dict[str, TableSpec] = {}


def table(name: str, *sources: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register ``render`` as table ``name`` built from ``docs/results/<source>``."""

    def register(render: Callable[..., str]) -> Callable[..., str]:
        TABLES[name] = TableSpec(name, tuple(f"{RESULTS}/{s}" for s in sources), render)
        return render

    return register


def row(cells: list[Any]) -> str:
    # An empty cell is "| |", as the docs write it by hand.
    return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"


def rows(header: list[str], body: list[list[Any]]) -> str:
    return "\n".join([row(header), "|" + "---|" * len(header), *(row(cells) for cells in body)])


def trace_name(trace: str) -> str:
    """``azure_2023_conv`` -> ``conv``."""
    return trace.rsplit("_", 1)[-1]


def pct(fraction: float, digits: int = 0) -> str:
    """``0.9`` -> ``90 %`` (the docs put a space before the sign)."""
    return f"{fraction * 100:.{digits}f} %"


def spread(values: list[float], fmt: str) -> str:
    """``min-max`` of repeats, each formatted with ``fmt``."""
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


# --------------------------------------------------------------------- baselines_sim.json


def best_of(goodputs: dict[str, float], prefix: str) -> tuple[str, float]:
    """The configuration named ``prefix-<chunk>`` with the highest mean goodput."""
    name = max((n for n in goodputs if n.startswith(prefix + "-")), key=goodputs.__getitem__)
    return name, goodputs[name]


def per_window(summary: dict[str, Any]) -> str:
    return ", ".join(f"{w['ratio']:.2f}x" for w in summary["per_window_over_own_best"])


def config_label(name: str) -> str:
    """``srpf-1024`` -> ``srpf, 1024-token chunks``."""
    policy, _, chunk = name.rpartition("-")
    return f"{policy}, {chunk}-token chunks" if chunk.isdigit() else name


@table("baselines_sim_summary", "baselines_sim.json")
def baselines_sim_summary(report: dict[str, Any]) -> str:
    body = []
    for s in report["summaries"]:
        g = s["mean_goodput_req_per_s"]
        best = s["best_baseline"]
        _, chunked_edf = best_of(g, "chunked-edf")
        body.append(
            [
                trace_name(s["trace"]),
                s["workers"],
                f"{g['flowprefill']:.2f}",
                f"{g[best]:.2f} ({config_label(best)})",
                f"{s['flowprefill_over_best']:.2f}x",
                per_window(s),
                f"{g['flowprefill'] / chunked_edf:.2f}x",
            ]
        )
    header = ["trace", "workers", "flowprefill", "best baseline", "flowprefill / best"]
    header += ["per window, vs its own best", "flowprefill / best chunked EDF"]
    return rows(header, body)


@table("baselines_sim", "baselines_sim.json")
def baselines_sim(report: dict[str, Any]) -> str:
    body = []
    for s in report["summaries"]:
        g = s["mean_goodput_req_per_s"]
        best = s["best_baseline"]
        edf_name, edf_chunked = best_of(g, "chunked-edf")
        body.append(
            [
                trace_name(s["trace"]),
                s["workers"],
                f"{g['flowprefill']:.2f}",
                f"{best} {g[best]:.2f}",
                f"{edf_chunked:.2f} ({edf_name.rpartition('-')[2]})",
                *(f"{best_of(g, p)[1]:.2f}" for p in ("srpf", "priority_chunked", "edf_giveup")),
                f"{g['edf']:.2f}",
                f"{g['fcfs']:.2f}",
                f"**{s['flowprefill_over_best']:.2f}x** ({per_window(s)})",
            ]
        )
    header = ["trace", "workers", "flowprefill", "best baseline", "chunked EDF (best size)"]
    header += ["srpf", "priority_chunked", "edf_giveup", "edf", "fcfs", "flowprefill / best"]
    return rows(header, body)


@table("baselines_sim_chunk_sizes", "baselines_sim.json")
def baselines_sim_chunk_sizes(report: dict[str, Any]) -> str:
    sizes = [int(c) for c in str(report["args"]["chunk_sizes"]).split(",")]
    body = []
    for s in report["summaries"]:
        g = s["mean_goodput_req_per_s"]
        cells = [f"{g[f'chunked-edf-{c}']:.2f}" for c in sizes]
        body.append([trace_name(s["trace"]), s["workers"], *cells])
    return rows(["trace", "workers", *(f"{c}-token chunks" for c in sizes)], body)


ABLATIONS = {
    "fp-no-preemption": "no preemption",
    "fp-token-bound-batching": "token-bound batching (no alpha check)",
    "fp-no-batching": "no batching",
    "fp-layer": "layer granularity",
    "fp-operator": "operator granularity",
}


@table("baselines_sim_ablations", "baselines_sim.json")
def baselines_sim_ablations(report: dict[str, Any]) -> str:
    body = []
    for s in report["summaries"]:
        ratios = s["ablation_over_flowprefill"]
        # Bold: an ablation that loses more than half of the goodput.
        cells = [
            f"**{ratios[a]:.2f}**" if ratios[a] < 0.5 else f"{ratios[a]:.2f}" for a in ABLATIONS
        ]
        body.append([trace_name(s["trace"]), s["workers"], *cells])
    return rows(["trace", "workers", *ABLATIONS.values()], body)


# ----------------------------------------------------------------- prefix_routing_sim.json

PREFIX_WORKLOADS = {
    "mooncake": "Mooncake, {block}-token blocks, SLO x{slo:g}",
    "multiturn": "multi-turn chat, {conversations} conversations x {turns} turns, "
    "{block}-token blocks",
}


def cache_size(tokens: int) -> str:
    return f"{tokens // 1_000_000}M" if tokens % 1_000_000 == 0 else f"{tokens // 1000}k"


@table("prefix_routing_sim", "prefix_routing_sim.json")
def prefix_routing_sim(report: dict[str, Any]) -> str:
    body = []
    for workload, result in report["workloads"].items():
        first = result["repeats"][0]
        label = PREFIX_WORKLOADS[workload].format(
            block=first["block_tokens"], slo=first["slo_scale"], **report["args"]
        )
        for variant, row in result["variants"].items():
            if variant.startswith("random "):
                continue  # within 0.1x of least_loaded; the text says so
            repeats = list(row["repeats"].values())
            hits = [e.get("hit_token_fraction") for e in repeats]
            tokens = row["cache_tokens_per_worker"]
            body.append(
                [
                    label,
                    variant.split(" ")[0] if tokens else variant,
                    cache_size(tokens) if tokens else "-",
                    ", ".join(f"{e['goodput_rps']:.2f}" for e in repeats),
                    f"{row['vs_no_cache']:.2f}x",
                    "-" if None in hits else pct(statistics.mean(hits), 1),
                ]
            )
            label = ""
    header = ["workload", "variant", "cache per worker (tokens)", "goodput req/s (repeats)"]
    header += ["vs no cache", "prompt tokens from cache"]
    return rows(header, body)


# ------------------------------------------------------------- admission_headroom_sim.json


def admission_label(name: str, settings: dict[str, Any]) -> str:
    """``reject/queue-unprotected`` -> ``reject, queue, unprotected``; the headroom named."""
    action, _, estimate = name.partition("/")
    estimate, _, variant = estimate.partition("-")
    estimate = estimate.split("+")[0]
    parts = [action] if action == "admit" else [action, estimate]
    if variant:
        parts.append(variant)
    if settings.get("headroom"):
        parts.append(f"headroom {settings['headroom']:g}")
    return ", ".join(parts)


@table("admission_overload_sim", "admission_headroom_sim.json")
def admission_overload_sim(report: dict[str, Any]) -> str:
    body = [
        [
            r["policy"],
            admission_label(r["admission"], report["settings"][r["admission"]]),
            f"{r['requests']:,}",
            *(f"{r[k]:.3f}" for k in ("attainment", "attainment_in_force", "admitted_attainment")),
            r["rejected"],
            r["downgraded"],
            r["peak_waiting"],
        ]
        for r in report["rows"]
    ]
    header = ["policy", "admission", "requests", "attain", "in force", "admitted", "rejected"]
    return rows([*header, "downgraded", "peak"], body)


# -------------------------------------------------------- scheduler_overhead_timeline.json


@table("scheduler_overhead_timeline", "scheduler_overhead_timeline.json")
def scheduler_overhead_timeline(report: dict[str, Any]) -> str:
    """CPU time per event at the deepest queue, without and with the timeline recording."""
    depth = max(r["queued"] for r in report["rows"])
    cells: dict[tuple[str, str], dict[bool, dict[str, Any]]] = {}
    for r in report["rows"]:
        if r["queued"] == depth:
            cells.setdefault((r["policy"], r["event"]), {})[r["timeline"]] = r
    body = []
    for (policy, event), by_timeline in cells.items():
        off, on = by_timeline[False], by_timeline[True]
        body.append(
            [
                policy,
                event,
                f"{off['cpu_p50_us']:.1f} -> {on['cpu_p50_us']:.1f}",
                f"{off['cpu_p99_us']:.1f} -> {on['cpu_p99_us']:.1f}",
            ]
        )
    header = ["policy", f"event ({depth:,} queued)", "CPU p50 us, without -> with timeline"]
    return rows([*header, "CPU p99 us, without -> with"], body)


# --------------------------------------------------------- scheduler_overhead_knobs.json


@table("scheduler_overhead_knobs", "scheduler_overhead_knobs.json")
def scheduler_overhead_knobs(report: dict[str, Any]) -> str:
    """CPU time per event at the deepest queue for each policy variant, beside the first."""
    depth = max(r["queued"] for r in report["rows"])
    at_depth = [r for r in report["rows"] if r["queued"] == depth]
    base = at_depth[0]["variant"]
    by_cell = {(r["policy"], r["variant"], r["event"]): r for r in at_depth}
    body = []
    for r in at_depth:
        ref = by_cell[(r["policy"], base, r["event"])]
        body.append(
            [
                r["policy"],
                r["variant"],
                r["event"],
                f"{r['cpu_p50_us']:.1f} ({r['cpu_p50_us'] / ref['cpu_p50_us']:.2f}x)",
                f"{r['cpu_p99_us']:.1f} ({r['cpu_p99_us'] / ref['cpu_p99_us']:.2f}x)",
                r["given_up_in_cell"],
            ]
        )
    header = ["policy", "variant", f"event ({depth:,} queued)", f"CPU p50 us (x {base})"]
    return rows([*header, f"CPU p99 us (x {base})", "given up in the cell"], body)
