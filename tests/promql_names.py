"""Test helper: which metric names a PromQL expression reads, and which names Ray exports for
the metric registry. Shared by the dashboard and alert-rule tests."""

from __future__ import annotations

import re

from flowprefill_ray.runtime.metrics import METRICS

# PromQL words that look like identifiers but are not metric names.
_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def exported_series() -> set[str]:
    """Every series name Ray's exporter produces for the registry (checked against a live
    scrape in test_serve_metrics.py): ``ray_`` prefix, histograms as _bucket/_sum/_count,
    counters ending in _total exactly once."""
    names: set[str] = set()
    for spec in METRICS:
        base = f"ray_{spec.name}"
        if spec.kind == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif spec.kind == "counter":
            names.add(base if base.endswith("_total") else f"{base}_total")
        else:
            names.add(base)
    return names


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions (followed
    by '('), keywords, label names (inside {} or after by/without/on), durations, template
    text ({{ ... }}) or $variables."""
    text = re.sub(r"\{\{.*?\}\}", "", expr)  # alert template text
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names
