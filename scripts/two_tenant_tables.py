"""The docs' tables of the two-tenant simulator ablations (``benchmarks/two_tenant_sim.py``,
issue 21), each rendered from its committed JSON in ``docs/results``; registered in
``result_tables.TABLES`` and found by ``scripts/benchmark_tables.py`` through the markers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from result_tables import rows, spread, table

# --------------------------------------------------------------------- why_late_sim.json

TWO_TENANT_VARIANTS = {
    "no_batch_margin": "no batch margin (before)",
    "shipped": "batch margin (shipped)",
    "no_protect": "+ no protection",
    "reserve": "+ reserve for tighter",
    "reserve_no_protect": "+ both",
    "reserve_measured": "+ reserve, `reserve_cost: measured`",
    "reserve_measured_no_protect": "+ the same, no protection",
}


def rate_keys(report: dict[str, Any]) -> list[str]:
    """The fixed rates a two_tenant_sim report holds, as its per-seed keys (``x0.19``)."""
    return [f"x{r:g}" for r in report["args"]["rate"]]


def why_late_total(
    seeds: list[dict[str, Any]], rates: list[str], key: str, cls: str = "all"
) -> int:
    """One why-late count (a cause, or ``rejected``) of class ``cls`` (``all``: every class)
    summed over every seed and rate."""
    return sum(s[r]["why_late"][cls][key] for s in seeds for r in rates)


def class_attainment(seed: dict[str, Any], rate: str, cls: str) -> float:
    value = seed[rate]["by_class"][cls]
    return value["attainment"] if isinstance(value, dict) else value


@table("why_late_sim", "why_late_sim.json")
def why_late_sim(report: dict[str, Any]) -> str:
    return variant_table(report, TWO_TENANT_VARIANTS, {})


Column = Callable[[list[dict[str, Any]], list[str]], str]


def variant_table(report: dict[str, Any], labels: dict[str, str], extra: dict[str, Column]) -> str:
    """One row per variant of a two_tenant_sim report: its label (``labels``, else its name),
    ``two_tenant_cells``, then one cell per ``extra`` column, named by its key and computed
    from the variant's seeds and the report's rates."""
    rates = rate_keys(report)
    body = []
    for name, variant in report["variants"].items():
        seeds = list(variant["seeds"].values())
        cells = [column(seeds, rates) for column in extra.values()]
        body.append([labels.get(name, name), *two_tenant_cells(seeds, rates), *cells])
    return rows(two_tenant_header(report, rates) + list(extra), body)


def total(cause: str, cls: str = "all") -> Column:
    """A column: ``cause``'s count (a why-late cause, ``missed`` or ``rejected``) of class
    ``cls`` over every seed and rate."""
    return lambda seeds, rates: str(why_late_total(seeds, rates, cause, cls))


def refused_by_tenant(seeds: list[dict[str, Any]], rates: list[str]) -> str:
    """Refusals of the urgent / relaxed tenant over every seed and rate."""
    refused = [why_late_total(seeds, rates, "rejected", cls) for cls in ("urgent", "relaxed")]
    return " / ".join(map(str, refused))


def two_tenant_cells(seeds: list[dict[str, Any]], rates: list[str]) -> list[str]:
    """A two_tenant_sim variant's goodputs (mean and range over seeds) and its per-class
    attainment at each fixed rate (mean over seeds)."""
    cells = []
    for key in ("goodput_overall_scale", "goodput_every_class_scale"):
        values = [s[key] for s in seeds]
        cells.append(f"x{statistics.mean(values):.3f} ({spread(values, '.3f')})")
    for cls in ("urgent", "relaxed"):
        means = [statistics.mean(class_attainment(s, r, cls) for s in seeds) for r in rates]
        cells.append(" / ".join(f"{m:.3f}" for m in means))
    return cells


def two_tenant_header(report: dict[str, Any], rates: list[str]) -> list[str]:
    seeds = report["args"]["seeds"]
    header = [
        "variant",
        f"goodput (overall; range of {seeds} seeds)",
        "goodput (every class; range)",
    ]
    return header + [f"{cls} at {' / '.join(rates)}" for cls in ("urgent", "relaxed")]


OVERRUN_GRACE_VARIANTS = {
    "no_grace": "no overrun grace (before)",
    "shipped": "overrun grace (shipped)",
    "give_up": "+ `late_give_up_factor: 1`",
    "token_bound_512": "+ `token_bound: 512`",
}


@table("overrun_grace_sim", "overrun_grace_sim.json")
def overrun_grace_sim(report: dict[str, Any]) -> str:
    """why_late_sim's columns, then what the two changes act on: misses by the two causes
    they address, refusals, and the relaxed tenant's TTFT tail at the highest rate."""
    top = rate_keys(report)[-1]

    def causes(seeds: list[dict[str, Any]], rates: list[str]) -> str:
        counts = [why_late_total(seeds, rates, c) for c in ("batch_overran", "paused_after_late")]
        return " / ".join(str(c) for c in counts)

    def tail(seeds: list[dict[str, Any]], rates: list[str]) -> str:
        p99 = [s[top]["ttft_s"]["relaxed"]["p99"] for s in seeds]
        return f"{statistics.mean(p99):.1f} ({spread(p99, '.1f')})"

    return variant_table(
        report,
        OVERRUN_GRACE_VARIANTS,
        {
            "missed: batch overran / paused after late (all rates, seeds)": causes,
            "refused (all rates, seeds)": total("rejected"),
            f"relaxed TTFT p99 at {top}, s (range)": tail,
        },
    )


RESERVE_FACTOR_VARIANTS = {
    "shipped": "shipped (no reservation, protection on)",
    "late_grace": "shipped + `late_grace`",
    "reserve_no_protect": "reservation x1, no protection",
    "reserve_x1.5_no_protect": "reservation x1.5, no protection",
    "reserve_x2_no_protect": "reservation x2, no protection",
    "reserve_x3_no_protect": "reservation x3, no protection",
}


@table("reserve_factor_sim", "reserve_factor_sim.json")
def reserve_factor_sim(report: dict[str, Any]) -> str:
    """why_late_sim's columns, then the refusals (all rates and seeds) the reserve buys."""
    return variant_table(
        report,
        RESERVE_FACTOR_VARIANTS,
        {"refused (all rates, seeds)": total("rejected")},
    )


OVERTAKE_VARIANTS = {
    "shipped": "shipped (protection on, no overtaking)",
    "overtake": "+ `overtake_looser` (demoting the overtaken)",
}


@table("overtake_sim", "overtake_sim.json")
def overtake_sim(report: dict[str, Any]) -> str:
    """why_late_sim's columns, then refusals per tenant and the relaxed misses the overtaking
    caused (all rates and seeds)."""
    return variant_table(
        report,
        OVERTAKE_VARIANTS,
        {
            "refused urgent / relaxed (all rates, seeds)": refused_by_tenant,
            "missed for `overtaken_by_tighter`": total("overtaken_by_tighter"),
        },
    )


PROTECT_UNITS_VARIANTS = {
    "shipped": "shipped (waiting requests protected)",
    "protect_units": "+ `protect_units` (running and paused units protected too)",
    "protect_units_overtake": "+ `protect_units` + `overtake_looser`",
}


@table("protect_units_sim", "protect_units_sim.json")
def protect_units_sim(report: dict[str, Any]) -> str:
    """why_late_sim's columns, then the misses of units that turned late while paused and the
    refusals per tenant (all rates and seeds)."""
    return variant_table(
        report,
        PROTECT_UNITS_VARIANTS,
        {
            "missed: paused after late (all rates, seeds)": total("paused_after_late"),
            "refused urgent / relaxed (all rates, seeds)": refused_by_tenant,
        },
    )


ADMISSION_VARIANTS = {
    "shipped": "shipped (overtaking on, overtaken demoted)",
    "queue_cost": "+ `queue_cost: measured`",
    "refuse_overtaken": "+ `overtaken: refuse`",
}


OVERTAKE_CAP_VARIANTS = {
    "shipped": "shipped (no limit)",
    "cap1": "`max_overtaken: 1`",
    "cap2": "`max_overtaken: 2`",
}


@table("overtake_cap_sim", "overtake_cap_sim.json")
def overtake_cap_sim(report: dict[str, Any]) -> str:
    """admission_variants_sim's columns for the caps on overtaking."""
    return admission_variants_sim(report, OVERTAKE_CAP_VARIANTS)


@table("admission_variants_sim", "admission_variants_sim.json")
def admission_variants_sim(
    report: dict[str, Any], variants: dict[str, str] = ADMISSION_VARIANTS
) -> str:
    """why_late_sim's columns, then the urgent requests admitted that missed, the relaxed
    ones overtaken that missed, and the refusals per tenant (all rates and seeds)."""
    return variant_table(
        report,
        variants,
        {
            "urgent admitted, missed": total("missed", "urgent"),
            "missed for `overtaken_by_tighter`": total("overtaken_by_tighter"),
            "refused urgent / relaxed (all rates, seeds)": refused_by_tenant,
        },
    )
