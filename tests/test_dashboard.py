"""The Grafana dashboard queries only metrics the system exports, and covers the SLO views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from promql_names import exported_series, metric_names_in

from flowprefill_ray.serve.dashboard import build_dashboard

GRAFANA_DIR = Path(__file__).resolve().parent.parent / "k8s" / "grafana"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA_DIR / "flowprefill-dashboard.json").read_text())


def test_the_metric_name_parser_finds_metrics_and_skips_functions_and_labels():
    expr = (
        'histogram_quantile(0.9, sum by (le, slo_class) (rate(ray_a_bucket{job="x"}[5m]))) '
        "/ on (worker_id) group_left max(ray_b) > bool 0"
    )
    assert metric_names_in(expr) == {"ray_a_bucket", "ray_b"}


def test_every_panel_query_names_only_exported_metrics(dashboard):
    allowed = exported_series()
    seen: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names_in(target["expr"])
            assert names, f"query of {panel['title']!r} names no metric: {target['expr']}"
            unknown = names - allowed
            assert not unknown, f"panel {panel['title']!r} queries unexported {sorted(unknown)}"
            seen |= names
    # The dashboard reads the SLO counters and the TTFT histogram at least.
    assert {"ray_flowprefill_slo_met_total", "ray_flowprefill_slo_missed_total",
            "ray_flowprefill_time_to_first_token_seconds_bucket"} <= seen


def test_panels_use_the_datasource_variable(dashboard):
    variables = dashboard["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    name = next(v["name"] for v in variables if v["type"] == "datasource")
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == f"${{{name}}}"
        assert all(t["datasource"]["uid"] == f"${{{name}}}" for t in panel["targets"])


@pytest.mark.parametrize(
    "topic, metric",
    [
        ("TTFT percentiles per SLO class", "time_to_first_token_seconds_bucket"),
        ("SLO attainment per class", "slo_missed_total"),
        ("Goodput", "slo_met_total"),
        ("Preemptions per second", "preemptions_total"),
        ("Preemption blocking time", "preemption_blocking_seconds_bucket"),
        ("Queue depth", "prefill_requests_waiting"),
        ("Prefill worker utilisation", "prefill_requests_running"),
        ("Decode worker load", "decode_kv_usage_ratio"),
        ("KV transfer throughput", "kv_transfer_bytes_total"),
        ("KV transfer time", "kv_transfer_seconds_bucket"),
        ("Decode inter-token latency", "inter_token_latency_seconds_bucket"),
    ],
)
def test_dashboard_has_each_required_view(dashboard, topic, metric):
    panel = next((p for p in dashboard["panels"] if p["title"].startswith(topic)), None)
    assert panel is not None, f"no panel titled {topic!r}"
    exprs = " ".join(t["expr"] for t in panel["targets"])
    assert f"ray_flowprefill_{metric}" in exprs


def test_per_class_panels_group_by_slo_class(dashboard):
    for title in ("TTFT percentiles per SLO class", "SLO attainment per class",
                  "Decode inter-token latency"):
        panel = next(p for p in dashboard["panels"] if p["title"] == title)
        assert all("slo_class" in t["expr"] for t in panel["targets"])


def test_committed_dashboard_is_what_the_builder_produces(dashboard):
    # A stale file would show panels the registry no longer backs.
    assert dashboard == build_dashboard(), (
        "k8s/grafana is stale: run `python -m flowprefill_ray.serve.dashboard --out k8s/grafana`"
    )


def test_configmap_carries_the_dashboard_for_the_grafana_sidecar(dashboard):
    configmap = yaml.safe_load((GRAFANA_DIR / "dashboard-configmap.yaml").read_text())
    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = configmap["data"].values()
    assert json.loads(payload) == dashboard
