"""The Grafana dashboard, built from the metric registry so its queries cannot drift from it.

Every query names metrics through ``exported()``, which looks the name up in
``flowprefill_ray.runtime.metrics.METRICS`` and applies the suffix rules of Ray's exporter
(``ray_`` prefix; histograms as ``_bucket``/``_sum``/``_count``; counters end in ``_total``).
A renamed or removed metric therefore fails here, at build time, not as an empty panel.

Regenerate the committed files after changing a panel or the registry::

    .venv/bin/python scripts/grafana_dashboard.py --out k8s/grafana

A build-time tool, not part of the serving system: nothing in the package imports it, so it
lives in ``scripts/``; ``tests/test_dashboard.py`` loads it by path and checks the committed
files against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from flowprefill_ray.runtime.metrics import METRICS_BY_NAME

DASHBOARD_FILE = "flowprefill-dashboard.json"
CONFIGMAP_FILE = "dashboard-configmap.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def exported(name: str, series: str = "") -> str:
    """The Prometheus series name Ray exports for registry metric ``name``.

    ``series`` is ``"bucket"``, ``"sum"`` or ``"count"`` for histograms and empty otherwise.
    """
    spec = METRICS_BY_NAME[name]  # KeyError = the metric is not in the registry
    if spec.kind == "histogram":
        if series not in ("bucket", "sum", "count"):
            raise ValueError(f"histogram {name!r} needs series bucket, sum or count")
        return f"ray_{name}_{series}"
    if series:
        raise ValueError(f"{spec.kind} {name!r} has no {series!r} series")
    if spec.kind == "counter" and not name.endswith("_total"):
        return f"ray_{name}_total"
    return f"ray_{name}"


def _quantile(q: float, histogram: str, by: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
        f"(rate({exported(histogram, 'bucket')}[{RATE}])))"
    )


def _rate(counter: str, by: str = "", matchers: str = "", window: str = RATE) -> str:
    grouping = f" by ({by})" if by else ""
    selector = f"{exported(counter)}{{{matchers}}}" if matchers else exported(counter)
    return f"sum{grouping} (rate({selector}[{window}]))"


# finish_reason values that mean the request failed (the client got an error, not tokens).
FAILED_REASONS = "error|timeout"


def attainment(window: str = RATE) -> str:
    """Per class, the fraction of requests whose first token met the TTFT SLO.

    PromQL drops a class from ``met / (met + missed)`` as soon as one of the two series is
    missing (a class that never missed, or never met), so each side falls back to 0 times the
    other with ``or``, and the total is ``met + missed``, else whichever exists. A class with
    no requests in the window stays undefined (0 / 0), not 0 %.
    """
    met = _rate("flowprefill_slo_met_total", "slo_class", window=window)
    missed = _rate("flowprefill_slo_missed_total", "slo_class", window=window)
    return f"({met} or 0 * {missed}) / ({met} + {missed} or {met} or {missed})"


def _target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"refId": ref, "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}


def _panel(
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    *,
    max_value: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "min": 0}
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        },
        "targets": [
            _target(chr(ord("A") + i), expr, legend) for i, (expr, legend) in enumerate(targets)
        ],
    }


def _panels() -> list[dict[str, Any]]:
    ttft = "flowprefill_time_to_first_token_seconds"
    met, missed = "flowprefill_slo_met_total", "flowprefill_slo_missed_total"
    blocking = "flowprefill_preemption_blocking_seconds"
    itl = "flowprefill_inter_token_latency_seconds"
    kv_seconds = "flowprefill_kv_transfer_seconds"
    running = exported("flowprefill_prefill_requests_running")
    finished = "flowprefill_requests_finished_total"
    failed = f'finish_reason=~"{FAILED_REASONS}"'
    return [
        _panel(
            "TTFT percentiles per SLO class",
            "Time to first token (arrival to first token) by SLO class.",
            "s",
            [
                (_quantile(q, ttft, "slo_class"), f"p{int(q * 100)} {{{{slo_class}}}}")
                for q in (0.5, 0.9, 0.99)
            ],
        ),
        _panel(
            "SLO attainment per class",
            "Fraction of finished requests whose first token met their TTFT SLO.",
            "percentunit",
            [(attainment(), "{{slo_class}}")],
            max_value=1,
        ),
        _panel(
            "Goodput (SLO-meeting requests/s)",
            "Requests per second that met their TTFT SLO, beside all finished requests, those "
            "refused (HTTP 429) and those demoted behind a tighter class "
            "(admission.overtake_looser), per class.",
            "reqps",
            # `or vector(0)` / `or`: a line at 0 rather than none before the first event.
            [
                (f"{_rate(met)} or vector(0)", "goodput"),
                (f"{_rate(met)} + {_rate(missed)} or {_rate(met)} or {_rate(missed)}", "finished"),
                (_rate(met, "slo_class"), "goodput {{slo_class}}"),
                (
                    _rate("flowprefill_requests_rejected_total", "slo_class"),
                    "rejected {{slo_class}}",
                ),
                (
                    _rate("flowprefill_requests_overtaken_total", "slo_class"),
                    "overtaken {{slo_class}}",
                ),
            ],
        ),
        _panel(
            "Preemptions per second",
            "Prefill units paused at a checkpoint, per prefill worker.",
            "ops",
            [(_rate("flowprefill_preemptions_total", "worker_id"), "{{worker_id}}")],
        ),
        _panel(
            "Preemption blocking time",
            "From a preempt call reaching the worker to the prefill stopping.",
            "s",
            [(_quantile(q, blocking, ""), f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)],
        ),
        _panel(
            "Queue depth",
            "Prefill requests waiting (global queue), running and paused, and decode waits.",
            "short",
            [
                (f"sum({exported('flowprefill_prefill_requests_waiting')})", "prefill waiting"),
                (f"sum({exported('flowprefill_prefill_requests_paused')})", "prefill paused"),
                (f"sum({running})", "prefill running"),
                (f"sum({exported('flowprefill_decode_requests_waiting')})", "decode waiting"),
            ],
        ),
        _panel(
            "Prefill worker utilisation",
            "Share of time each prefill worker had a unit running (from its gauge samples).",
            "percentunit",
            [
                (
                    f"avg_over_time((max by (worker_id) ({running}) > bool 0)[5m:15s])",
                    "{{worker_id}}",
                )
            ],
            max_value=1,
        ),
        _panel(
            "Prefill worker memory held",
            "Bytes each prefill worker holds between units: paused prefills' activations and "
            "KV, finished KV waiting for decode (0 when idle; growth while idle is a leak); "
            "and, apart, the KV blocks of its prefix cache (kept by design, up to its budget).",
            "bytes",
            [
                (
                    f"max by (worker_id) ({exported('flowprefill_prefill_held_bytes')})",
                    "{{worker_id}}",
                ),
                (
                    f"max by (worker_id) ({exported('flowprefill_prefix_cache_bytes')})",
                    "prefix cache {{worker_id}}",
                ),
            ],
        ),
        _panel(
            "Prefix cache hit rate",
            "Per prefill worker, the share of looked-up prompt tokens served from its prefix "
            "cache instead of being computed (cache off or no traffic: no data).",
            "percentunit",
            [
                (
                    # "> 0": a worker with nothing looked up shows no point, not 0 / 0.
                    f"{_rate('flowprefill_prefix_cache_hit_tokens_total', 'worker_id')} / "
                    f"({_rate('flowprefill_prefix_cache_query_tokens_total', 'worker_id')} > 0)",
                    "{{worker_id}}",
                )
            ],
            max_value=1,
        ),
        _panel(
            "Decode worker load",
            "Per decode worker: KV blocks in use (0..1) and sequences per decode step.",
            "short",
            [
                (
                    f"max by (worker_id) ({exported('flowprefill_decode_kv_usage_ratio')})",
                    "KV usage {{worker_id}}",
                ),
                (
                    f"max by (worker_id) ({exported('flowprefill_decode_batch_size')})",
                    "batch {{worker_id}}",
                ),
            ],
        ),
        _panel(
            "KV transfer throughput",
            "KV cache bytes per second moved from prefill to decode workers.",
            "Bps",
            [(_rate("flowprefill_kv_transfer_bytes_total"), "prefill -> decode")],
        ),
        _panel(
            "KV transfer time per request",
            "Time for a decode worker to fetch one request's KV cache.",
            "s",
            [(_quantile(q, kv_seconds, ""), f"p{int(q * 100)}") for q in (0.5, 0.99)],
        ),
        _panel(
            "Decode inter-token latency",
            "Gap between consecutive decode tokens, by SLO class.",
            "s",
            [
                (_quantile(q, itl, "slo_class"), f"p{int(q * 100)} {{{{slo_class}}}}")
                for q in (0.5, 0.9, 0.99)
            ],
        ),
        _panel(
            "TTFT predictor error",
            "Observed / predicted prefill compute time (1.0 = exact).",
            "short",
            [
                (_quantile(q, "flowprefill_ttft_prediction_ratio", ""), f"p{int(q * 100)}")
                for q in (0.1, 0.5, 0.9)
            ],
        ),
        _panel(
            "Prefill batch size",
            "Requests per prefill work unit (median and mean) and tokens per unit (median).",
            "short",
            # Batch sizes are integers; the buckets sit halfway between them, so the
            # interpolated median is within 0.5 of the true one and round() gives it.
            [
                (f"round({_quantile(0.5, 'flowprefill_prefill_batch_size', '')})", "requests p50"),
                (
                    f"sum(rate({exported('flowprefill_prefill_batch_size', 'sum')}[{RATE}])) / "
                    f"sum(rate({exported('flowprefill_prefill_batch_size', 'count')}[{RATE}]))",
                    "requests mean",
                ),
                (_quantile(0.5, "flowprefill_prefill_batch_tokens", ""), "tokens p50"),
            ],
        ),
        _panel(
            "Request outcomes",
            "Requests per second by how they ended: finish reason (stop, length, abort; "
            "error and timeout are failures the client saw), and refusals (HTTP 429).",
            "reqps",
            [
                (_rate(finished, "finish_reason"), "{{finish_reason}}"),
                (_rate("flowprefill_requests_rejected_total"), "rejected"),
            ],
        ),
        _panel(
            "Failed requests",
            "Share of finished requests that failed (finish reason error or timeout), "
            "overall and per SLO class.",
            "percentunit",
            [
                (f"{_rate(finished, matchers=failed)} / {_rate(finished)}", "all classes"),
                (
                    f"{_rate(finished, 'slo_class', failed)} / {_rate(finished, 'slo_class')}",
                    "{{slo_class}}",
                ),
            ],
            max_value=1,
        ),
    ]


def build_dashboard() -> dict[str, Any]:
    """The dashboard JSON model (Grafana schema 39): a datasource variable and the panels,
    laid out two per row."""
    panels = _panels()
    for index, panel in enumerate(panels):
        panel["id"] = index + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)}
    return {
        "title": "FlowPrefill: TTFT SLOs",
        "uid": "flowprefill-slo",
        "description": "TTFT SLO attainment, goodput, preemption and KV transfer of FlowPrefill.",
        "tags": ["flowprefill", "ray", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                }
            ]
        },
        "panels": panels,
    }


def build_configmap(dashboard_json: str) -> dict[str, Any]:
    """The ConfigMap the Grafana sidecar loads (it watches the ``grafana_dashboard`` label)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "flowprefill-grafana-dashboard",
            "labels": {"grafana_dashboard": "1", "app.kubernetes.io/name": "flowprefill"},
        },
        "data": {DASHBOARD_FILE: dashboard_json},
    }


def write(out_dir: Path) -> tuple[Path, Path]:
    """Write the dashboard JSON and its ConfigMap into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(build_dashboard(), indent=2) + "\n"
    dashboard_path = out_dir / DASHBOARD_FILE
    dashboard_path.write_text(text)
    configmap_path = out_dir / CONFIGMAP_FILE
    header = "# Generated by `python scripts/grafana_dashboard.py --out k8s/grafana`.\n"
    configmap_path.write_text(
        header + yaml.dump(build_configmap(text), Dumper=_BlockDumper, sort_keys=False)
    )
    return dashboard_path, configmap_path


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks (``|``) so the ConfigMap stays readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("k8s/grafana"))
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
