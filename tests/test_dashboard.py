"""The Grafana dashboard queries only metrics the system exports, covers the SLO views, and its
queries and the alert rules show what a user expects on recorded samples."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from promql_eval import SampleStore, by_label, duration_s, evaluate
from promql_names import exported_series, metric_names_in
from recorded_metrics import (
    CACHE_HIT_TOKENS_PER_REQUEST,
    DECODE_POD,
    END_S,
    FAILING_AT_S,
    HEALTHY_AT_S,
    PODS,
    PROMPT_TOKENS_PER_REQUEST,
    STEP_S,
    FakeRay,
    Recording,
    record,
    target_labels,
)
from repo_scripts import load_script

# The dashboard builder is a build-time script (scripts/), not part of the package.
_builder = load_script("scripts/grafana_dashboard.py")
attainment, build_dashboard = _builder.attainment, _builder.build_dashboard

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
    assert {
        "ray_flowprefill_slo_met_total",
        "ray_flowprefill_slo_missed_total",
        "ray_flowprefill_time_to_first_token_seconds_bucket",
    } <= seen


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
        ("Prefill worker memory held", "prefix_cache_bytes"),
        ("Prefix cache hit rate", "prefix_cache_hit_tokens_total"),
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
    for title in (
        "TTFT percentiles per SLO class",
        "SLO attainment per class",
        "Decode inter-token latency",
    ):
        panel = next(p for p in dashboard["panels"] if p["title"] == title)
        assert all("slo_class" in t["expr"] for t in panel["targets"])


def test_committed_dashboard_is_what_the_builder_produces(dashboard):
    # A stale file would show panels the registry no longer backs.
    assert dashboard == build_dashboard(), (
        "k8s/grafana is stale: run `python scripts/grafana_dashboard.py --out k8s/grafana`"
    )


def test_configmap_carries_the_dashboard_for_the_grafana_sidecar(dashboard):
    configmap = yaml.safe_load((GRAFANA_DIR / "dashboard-configmap.yaml").read_text())
    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = configmap["data"].values()
    assert json.loads(payload) == dashboard


# ------------------------------------------- what the panels and alerts show on recorded data
#
# The queries are evaluated (promql_eval.py) on samples recorded from a simulated cluster whose
# processes emit through the runtime's own RuntimeMetrics (recorded_metrics.py): "text" has
# traffic and misses, "search" never misses and is never rejected, "image" only appears in the
# failing half and never meets its SLO, "file" has no traffic at all.

IDLE_AT_HEALTHY = {"image", "file"}
# The attainment query before the fix: a class with no missed (or no met) series vanished.
OLD_ATTAINMENT = (
    "sum by (slo_class) (rate(ray_flowprefill_slo_met_total[$__rate_interval])) / "
    "(sum by (slo_class) (rate(ray_flowprefill_slo_met_total[$__rate_interval])) + "
    "sum by (slo_class) (rate(ray_flowprefill_slo_missed_total[$__rate_interval])))"
)


def _record(engine_zero_init: bool = True) -> Recording:
    import ray.util.metrics

    fake = FakeRay()
    with pytest.MonkeyPatch.context() as patch:
        for kind in ("Counter", "Gauge", "Histogram"):
            patch.setattr(ray.util.metrics, kind, getattr(fake, kind))
        return record(fake, engine_zero_init=engine_zero_init)


@pytest.fixture(scope="module")
def recording() -> Recording:
    return _record()


@pytest.fixture(scope="module")
def recording_without_zero_init() -> Recording:
    return _record(engine_zero_init=False)


def _target(dashboard: dict, title: str, legend: str) -> str:
    panel = next(p for p in dashboard["panels"] if p["title"].startswith(title))
    return next(t["expr"] for t in panel["targets"] if t["legendFormat"] == legend)


def _at(expr: str, recording: Recording, t: float, label: str = "slo_class") -> dict:
    return by_label(evaluate(expr, recording.store, t), label)


def test_every_panel_query_shows_data_on_the_recording(dashboard, recording):
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            result = evaluate(target["expr"], recording.store, HEALTHY_AT_S)
            where = f"{panel['title']!r}: {target['expr']}"
            assert isinstance(result, dict) and result, f"no data in {where}"
            for labels, value in result.items():
                assert not math.isinf(value), where
                # Undefined (0 / 0) only for a class without traffic, never for one with it.
                if math.isnan(value):
                    assert dict(labels).get("slo_class") in IDLE_AT_HEALTHY, (where, labels)


def test_attainment_shows_a_class_that_never_missed_and_one_that_never_met(
    dashboard, recording, recording_without_zero_init
):
    expr = _target(dashboard, "SLO attainment per class", "{{slo_class}}")
    for rec in (recording, recording_without_zero_init):
        healthy = _at(expr, rec, HEALTHY_AT_S)
        assert healthy["text"] == pytest.approx(28 / 30)
        assert healthy["search"] == 1.0  # never missed: 100 %, not missing
        # No traffic: no number at all (0 / 0), never a false 0 %.
        assert all(math.isnan(healthy.get(c, math.nan)) for c in IDLE_AT_HEALTHY)
        failing = _at(expr, rec, FAILING_AT_S)
        assert failing["text"] == pytest.approx(12 / 30)
        assert failing["search"] == 1.0
        assert failing["image"] == 0.0  # never met: 0 %, not missing
    # Without the zero-initialised series the old query dropped both.
    old = _at(OLD_ATTAINMENT, recording_without_zero_init, FAILING_AT_S)
    assert "search" not in old and "image" not in old and "text" in old


def test_rejections_and_failures_are_series_at_zero_from_start_up(dashboard, recording):
    rejected = _target(dashboard, "Goodput", "rejected {{slo_class}}")
    # Right after start-up every class has a rejection series, at 0 where none happened.
    early = _at(rejected, recording, 2 * STEP_S)
    assert set(early) == set(recording.classes)
    assert early["text"] > 0 and early["search"] == early["image"] == early["file"] == 0.0
    healthy = _at(rejected, recording, HEALTHY_AT_S)
    assert healthy == {"text": pytest.approx(1 / STEP_S), "image": 0.0, "search": 0.0, "file": 0.0}
    outcomes = _target(dashboard, "Request outcomes", "{{finish_reason}}")
    assert _at(outcomes, recording, HEALTHY_AT_S, "finish_reason") == {
        "stop": pytest.approx(42 / STEP_S),
        "length": pytest.approx(2 / STEP_S),
        "abort": pytest.approx(1 / STEP_S),
        "error": 0.0,
        "timeout": 0.0,
    }
    failing = _at(outcomes, recording, FAILING_AT_S, "finish_reason")
    assert failing["error"] == pytest.approx(9 / STEP_S)
    assert failing["timeout"] == pytest.approx(3 / STEP_S)
    share = _target(dashboard, "Failed requests", "all classes")
    assert _at(share, recording, HEALTHY_AT_S) == {"": 0.0}
    assert _at(share, recording, FAILING_AT_S) == {"": pytest.approx(12 / 47)}
    per_class = _at(_target(dashboard, "Failed requests", "{{slo_class}}"), recording, FAILING_AT_S)
    assert per_class["text"] == pytest.approx(12 / 30) and per_class["search"] == 0.0


def test_overtaken_requests_are_a_series_per_class_from_start_up(dashboard, recording):
    overtaken = _target(dashboard, "Goodput", "overtaken {{slo_class}}")
    # Zero-initialised by the engine like the rejections: every class from start-up, at 0
    # until a request of it is demoted (the recording demotes one text request per scrape).
    assert set(_at(overtaken, recording, 2 * STEP_S)) == set(recording.classes)
    healthy = _at(overtaken, recording, HEALTHY_AT_S)
    assert healthy == {"text": pytest.approx(1 / STEP_S), "image": 0.0, "search": 0.0, "file": 0.0}


def test_prefill_batch_size_median_is_the_integer_batch_size(dashboard, recording):
    expr = _target(dashboard, "Prefill batch size", "requests p50")
    # 10 units of 1 request, 12 of 2, 3 of 3: the median unit holds 2.
    assert evaluate(expr, recording.store, HEALTHY_AT_S) == {(): 2.0}
    # Unrounded, the interpolation stays within 0.5 of it, so the rounding is exact (with
    # bounds on the integers it read 1.2, which rounds to 1).
    raw = expr.removeprefix("round(").removesuffix(")")
    assert 1.5 < evaluate(raw, recording.store, HEALTHY_AT_S)[()] <= 2.5
    mean = evaluate(
        _target(dashboard, "Prefill batch size", "requests mean"), recording.store, HEALTHY_AT_S
    )
    assert mean == {(): pytest.approx((10 + 2 * 12 + 3 * 3) / 25)}


def test_prefix_cache_hit_rate_is_per_worker_and_absent_where_nothing_was_looked_up(
    dashboard, recording
):
    expr = _target(dashboard, "Prefix cache hit rate", "{{worker_id}}")
    rates = by_label(evaluate(expr, recording.store, HEALTHY_AT_S), "worker_id")
    # prefill-1's counters exist (zero-initialised) but never move: no point, not 0 / 0.
    assert rates == {
        "prefill-0": pytest.approx(CACHE_HIT_TOKENS_PER_REQUEST / (PROMPT_TOKENS_PER_REQUEST - 1))
    }


def test_slo_alerts_use_the_dashboards_attainment():
    squeeze = "".join
    for alert in _alerts():
        if alert["alert"].startswith("FlowPrefillSLOAttainment"):
            assert squeeze(attainment("10m").split()) in squeeze(alert["expr"].split())


# ------------------------------------------------------------------------------ alerts

RULES = GRAFANA_DIR.parent / "prometheusrule.yaml"


def _alerts() -> list[dict]:
    rule = yaml.safe_load(RULES.read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def _firing(store, t: float) -> dict[str, dict]:
    """Alert name -> its result at ``t``, for alerts whose expression held at every rule
    evaluation (every 15 s) over their ``for`` window up to ``t``."""
    fired = {}
    for alert in _alerts():
        hold = duration_s(alert.get("for", "0s"))
        times = [t - i * STEP_S for i in range(int(hold // STEP_S) + 1)]
        results = [evaluate(alert["expr"], store, at) for at in times]
        if all(results):
            fired[alert["alert"]] = results[0]
    return fired


def test_no_alert_fires_on_the_healthy_recording(recording):
    assert _firing(recording.store, HEALTHY_AT_S) == {}


def test_failure_alerts_fire_on_the_failing_recording(recording, recording_without_zero_init):
    fired = _firing(recording.store, FAILING_AT_S)
    assert set(fired) == {
        "FlowPrefillSLOAttainmentLow",
        "FlowPrefillSLOAttainmentCritical",
        "FlowPrefillPrefillQueueDeep",
        "FlowPrefillRejectingRequests",
        "FlowPrefillErrorRateHigh",
        "FlowPrefillScrapeTargetDown",
    }
    for name in ("FlowPrefillSLOAttainmentLow", "FlowPrefillSLOAttainmentCritical"):
        # image never met its SLO; search never missed and must not fire.
        assert by_label(fired[name], "slo_class") == {"text": pytest.approx(0.4), "image": 0.0}
    assert by_label(fired["FlowPrefillErrorRateHigh"], "job") == {"": pytest.approx(12 / 47)}
    assert set(by_label(fired["FlowPrefillScrapeTargetDown"], "pod")) == {DECODE_POD}
    # The SLO alerts do not depend on the zero-initialised series either.
    fired = _firing(recording_without_zero_init.store, FAILING_AT_S)
    assert set(by_label(fired["FlowPrefillSLOAttainmentCritical"], "slo_class")) == {
        "text",
        "image",
    }


def test_scrape_alerts_fire_without_targets_or_without_the_engine():
    nothing = SampleStore()
    assert set(_firing(nothing, FAILING_AT_S)) == {"FlowPrefillNoScrapeTargets"}
    # Ray pods answer, but no engine runs: nothing exports FlowPrefill metrics.
    idle = SampleStore()
    for step in range(int(FAILING_AT_S // STEP_S) + 1):
        for pod in PODS:
            idle.scrape(step * STEP_S, target_labels(pod), "")
    assert set(_firing(idle, FAILING_AT_S)) == {"FlowPrefillMetricsMissing"}


# ------------------------------------------------------ the evaluator against real Prometheus


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_evaluator_agrees_with_promtool(dashboard, recording, tmp_path):
    """Every panel query and alert expression, at both evaluation times: promtool (Prometheus'
    own engine) must return exactly what promql_eval.py returns (rounded to 1e-6; NaN samples
    are filtered out on both sides since promtool cannot expect them)."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in _alerts()] + [OLD_ATTAINMENT]
    tests = []
    for expr in exprs:
        for t in (HEALTHY_AT_S, FAILING_AT_S):
            wrapped = f"round(({expr}) == ({expr}), 0.000001)"
            expected = evaluate(wrapped, recording.store, t)
            tests.append(
                {
                    "expr": wrapped.replace("$__rate_interval", "1m"),
                    "eval_time": f"{int(t)}s",
                    "exp_samples": [
                        {
                            "labels": "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}",
                            "value": value,
                        }
                        for labels, value in expected.items()
                    ],
                }
            )
    steps = int(END_S // STEP_S) + 1
    input_series = []
    for labels, points in recording.store.series.items():
        values = ["_"] * steps
        for t, value in points:
            values[int(t // STEP_S)] = "stale" if value is None else repr(value)
        name = dict(labels)["__name__"]
        rest = ",".join(f'{k}="{v}"' for k, v in labels if k != "__name__")
        input_series.append({"series": f"{name}{{{rest}}}", "values": " ".join(values)})
    spec = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": input_series, "promql_expr_test": tests}],
    }
    path = tmp_path / "promtool_test.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
