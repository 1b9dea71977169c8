"""Test helper: recorded metric samples of a simulated FlowPrefill cluster, for evaluating the
dashboard's queries and the alert rules (promql_eval.py) on data shaped like the real thing.

The runtime's own ``RuntimeMetrics`` (and the engine's constructor, for its zero-initialised
series) emit into ``FakeRay``, which stands in for ``ray.util.metrics`` and renders each pod's
``/metrics`` text the way Ray 2.60's metrics agent does (same series names, Ray's labels
beside ours, counters kept while the process lives, gauges dropped some 20 s after their last
update). Prometheus' scrape is simulated every 15 s with the PodMonitor's target labels, and
the text goes through prometheus_client's parser. Only the traffic is synthetic: a fixed,
deterministic scenario whose expected per-class numbers the tests know.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

from promql_eval import SampleStore

from flowprefill_ray.runtime.config import RuntimeConfig
from flowprefill_ray.runtime.metrics import METRICS, RuntimeMetrics

STEP_S = 15.0  # the PodMonitor's scrape interval
END_S = 1800.0
FAILING_FROM_S = 900.0  # second half: errors, SLO misses, deep queues
DECODE_DOWN_FROM_S = 1200.0  # the decode pod stops answering scrapes
HEALTHY_AT_S = 607.0  # evaluation times: not on a scrape, windows inside one phase
FAILING_AT_S = 1777.0
GAUGE_TTL_S = 20.0  # Ray's agent stops exporting a gauge this long after its last update
PREFILL_WORKERS = ("prefill-0", "prefill-1")
JOB = "flowprefill"

# Per scrape interval, per class: (met, missed, finished by reason, rejected), in each phase.
# text: mixed; search: never misses and is never rejected; image: traffic only in the failing
# phase, all of it late (never met); file: no traffic at all.
HEALTHY = {
    "text": (28, 2, {"stop": 27, "length": 2, "abort": 1}, 1),
    "search": (15, 0, {"stop": 15}, 0),
}
FAILING = {
    "text": (12, 18, {"stop": 16, "length": 2, "error": 9, "timeout": 3}, 3),
    "search": (15, 0, {"stop": 15}, 0),
    "image": (0, 2, {"stop": 2}, 0),
}
# Prefill units per interval: (requests in the unit, how many such units). The median unit
# holds 2 requests (the 13th of 25); integer bucket bounds would interpolate it to 1.2.
UNIT_SIZES = ((1, 10), (2, 12), (3, 3))
PROMPT_TOKENS_PER_REQUEST = 512
# Of each prompt's tokens looked up in prefill-0's prefix cache (all but the last), how many
# it served; prefill-1 looks nothing up (its counters stay at their zero-initialised 0).
CACHE_HIT_TOKENS_PER_REQUEST = 192
KV_BYTES_PER_REQUEST = 1_000_000


def traffic(t: float) -> dict:
    return FAILING if t >= FAILING_FROM_S else HEALTHY


# ------------------------------------------------------------------- fake ray metrics


@dataclass
class _Process:
    pod: str
    worker_id: str


@dataclass
class _Series:
    kind: str
    description: str
    value: float = 0.0
    updated_s: float = 0.0
    boundaries: tuple[float, ...] = ()
    buckets: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0


class FakeRay:
    """Stands in for ``ray.util.metrics``: metric objects record into the process that is
    current (``with ray.process(...)``) when they are created, as in Ray where each worker
    process exports its own series."""

    def __init__(self) -> None:
        self.now = 0.0
        self._current: _Process | None = None
        # (pod, worker id, name, tags) -> series
        self.series: dict[tuple[str, str, str, tuple], _Series] = {}
        fake = self

        class _Metric:
            kind = ""

            def __init__(self, name, description="", tag_keys=None, boundaries=None):
                assert fake._current is not None, "create metrics inside `with ray.process()`"
                self._process = fake._current
                self._name = name
                self._description = description
                self._tag_keys = tuple(tag_keys or ())
                self._boundaries = tuple(boundaries or ())

            def _record(self, value, tags=None):
                tags = dict(tags or {})
                assert set(tags) == set(self._tag_keys), (self._name, tags)
                key = (
                    self._process.pod,
                    self._process.worker_id,
                    self._name,
                    tuple(sorted(tags.items())),
                )
                series = fake.series.get(key)
                if series is None:
                    series = fake.series[key] = _Series(
                        self.kind,
                        self._description,
                        boundaries=self._boundaries,
                        buckets=[0] * len(self._boundaries),
                    )
                series.updated_s = fake.now
                if self.kind == "counter":
                    series.value += value
                elif self.kind == "gauge":
                    series.value = value
                else:
                    series.count += 1
                    series.total += value
                    for i, bound in enumerate(self._boundaries):
                        if value <= bound:
                            series.buckets[i] += 1

        class Counter(_Metric):
            kind = "counter"

            def inc(self, value=1.0, tags=None):
                if value <= 0:  # as Ray's Counter.inc
                    raise ValueError(f"value must be >0, got {value}")
                self._record(value, tags)

        class Gauge(_Metric):
            kind = "gauge"

            def set(self, value, tags=None):
                self._record(value, tags)

        class Histogram(_Metric):
            kind = "histogram"

            def observe(self, value, tags=None):
                self._record(value, tags)

        self.Counter, self.Gauge, self.Histogram = Counter, Gauge, Histogram

    @contextlib.contextmanager
    def process(self, pod: str, worker_id: str):
        previous = self._current
        self._current = _Process(pod, worker_id)
        try:
            yield
        finally:
            self._current = previous

    def bind(self, pod: str, worker_id: str, metrics: RuntimeMetrics):
        """``metrics`` as used from that process: Ray metric objects it creates lazily, on
        first use, record into the process."""
        fake = self

        class _InProcess:
            def __getattr__(self, name):
                method = getattr(metrics, name)

                def call(*args, **kwargs):
                    with fake.process(pod, worker_id):
                        return method(*args, **kwargs)

                return call

        return _InProcess()

    def exposition(self, pod: str) -> str:
        """``pod``'s /metrics text in Ray 2.60's format (names, label layout, le values)."""
        families: dict[str, list[str]] = {}
        types: dict[str, tuple[str, str]] = {}
        for (series_pod, worker_id, name, tags), series in sorted(self.series.items()):
            if series_pod != pod:
                continue
            if series.kind == "gauge" and self.now - series.updated_s > GAUGE_TTL_S:
                continue
            base = f"ray_{name}"
            types[base] = (series.kind, series.description)
            ray_labels = (
                f'Component="core_worker",NodeAddress="{pod}",SessionName="session_x",'
                f'Version="2.60.0",WorkerId="{worker_id}"'
            )
            ours = "".join(f',{k}="{v}"' for k, v in tags)
            lines = families.setdefault(base, [])
            if series.kind == "histogram":
                for bound, count in zip(series.boundaries, series.buckets, strict=True):
                    lines.append(f'{base}_bucket{{{ray_labels}{ours},le="{bound}"}} {count}.0')
                lines.append(f'{base}_bucket{{{ray_labels}{ours},le="+Inf"}} {series.count}.0')
                lines.append(f"{base}_count{{{ray_labels}{ours}}} {series.count}.0")
                lines.append(f"{base}_sum{{{ray_labels}{ours}}} {series.total!r}")
            else:
                lines.append(f"{base}{{{ray_labels}{ours}}} {float(series.value)!r}")
        text = []
        for base, lines in families.items():
            kind, description = types[base]
            text += [f"# HELP {base} {description}", f"# TYPE {base} {kind}", *lines]
        return "\n".join(text) + "\n"


# ---------------------------------------------------------------------- the cluster

PODS = {
    # pod -> target labels Prometheus gives its series (PodMonitor relabelings, jobLabel)
    "flowprefill-head": {"ray_node_type": "head", "ray_group": "headgroup"},
    "flowprefill-prefill-gpu-0": {"ray_node_type": "worker", "ray_group": "prefill-gpu"},
    "flowprefill-prefill-gpu-1": {"ray_node_type": "worker", "ray_group": "prefill-gpu"},
    "flowprefill-decode-gpu-0": {"ray_node_type": "worker", "ray_group": "decode-gpu"},
}
HEAD, DECODE_POD = "flowprefill-head", "flowprefill-decode-gpu-0"


def target_labels(pod: str, job: str = JOB) -> dict[str, str]:
    return {
        "job": job,
        "namespace": "default",
        "pod": pod,
        "instance": f"{pod}:8080",
        "container": "ray",
        "endpoint": "metrics",
        **PODS[pod],
    }


def fake_engine(config: RuntimeConfig, prefill_workers=PREFILL_WORKERS, scheduler=None):
    """A FlowPrefillEngine built by its real constructor around fakes (no Ray, no model)."""
    from flowprefill_ray.runtime.engine import FlowPrefillEngine
    from flowprefill_ray.runtime.placement import Workers

    # The ModelConfig attributes the engine reads (context_limit is a property there).
    model_config = SimpleNamespace(context_limit=4096, eos_token_id=2, vocab_size=1000)
    return FlowPrefillEngine(
        config,
        scheduler,
        Workers(prefill=dict.fromkeys(prefill_workers)),
        SimpleNamespace(eos_token_id=2),
        model_config,
    )


@dataclass
class Recording:
    store: SampleStore
    classes: list[str]


def record(ray: FakeRay, *, engine_zero_init: bool = True) -> Recording:
    """Run the scenario from 0 to END_S, scraping every pod every STEP_S.

    ``engine_zero_init=False`` replays the same traffic without the engine's zero-initialised
    series (as before they existed), to show the queries do not depend on them."""
    config = RuntimeConfig()
    classes = config.slo.class_names
    store = SampleStore()
    with ray.process(HEAD, "engine"):  # the Serve replica's process
        engine_metrics = fake_engine(config)._metrics if engine_zero_init else RuntimeMetrics()
    engine_metrics = ray.bind(HEAD, "engine", engine_metrics)
    scheduler = ray.bind(HEAD, "scheduler", RuntimeMetrics())
    decode = ray.bind(DECODE_POD, "decode-0", RuntimeMetrics())
    other = ray.bind(HEAD, "other", RuntimeMetrics())
    t = 0.0
    while t <= END_S:
        ray.now = t
        if t > 0:
            _one_interval(t, engine_metrics, scheduler, decode)
            _every_other_metric(other)
        for pod in PODS:
            if pod == DECODE_POD and t >= DECODE_DOWN_FROM_S:
                store.scrape_failed(t, target_labels(pod))
            else:
                store.scrape(t, target_labels(pod), ray.exposition(pod))
        t += STEP_S
    return Recording(store, classes)


# The metrics each simulated process emits below; every other registry metric gets one
# generic sample per interval (so a panel added for a new metric has data to show).
_COVERED = {
    "flowprefill_time_to_first_token_seconds",
    "flowprefill_time_per_output_token_seconds",
    "flowprefill_e2e_request_latency_seconds",
    "flowprefill_requests_finished_total",
    "flowprefill_request_queue_time_seconds",
    "flowprefill_slo_met_total",
    "flowprefill_slo_missed_total",
    "flowprefill_requests_rejected_total",
    "flowprefill_prompt_tokens_total",
    "flowprefill_prefill_batch_size",
    "flowprefill_prefill_batch_tokens",
    "flowprefill_preemptions_total",
    "flowprefill_preemption_blocking_seconds",
    "flowprefill_prefill_requests_waiting",
    "flowprefill_prefill_requests_running",
    "flowprefill_prefill_requests_paused",
    "flowprefill_ttft_prediction_ratio",
    "flowprefill_scheduler_event_seconds",
    "flowprefill_kv_transfer_bytes_total",
    "flowprefill_kv_transfer_seconds",
    "flowprefill_inter_token_latency_seconds",
    "flowprefill_generation_tokens_total",
    "flowprefill_decode_batch_size",
    "flowprefill_decode_requests_waiting",
    "flowprefill_decode_kv_usage_ratio",
    "flowprefill_prefix_cache_query_tokens_total",
    "flowprefill_prefix_cache_hit_tokens_total",
    "flowprefill_prefix_cache_bytes",
}
_GENERIC_LABELS = {
    "slo_class": "text",
    "worker_id": "prefill-0",
    "event": "arrival",
    "served_class": "search",
    "finish_reason": "stop",
}


def _one_interval(t: float, engine, scheduler, decode) -> None:
    """What the engine, scheduler and decode worker emit in one scrape interval."""
    failing = t >= FAILING_FROM_S
    requests = 0
    for cls, (met, missed, reasons, rejected) in traffic(t).items():
        requests += met + missed
        for _ in range(met):
            engine.inc("flowprefill_slo_met_total", slo_class=cls)
            engine.observe("flowprefill_time_to_first_token_seconds", 0.09, slo_class=cls)
        for _ in range(missed):
            engine.inc("flowprefill_slo_missed_total", slo_class=cls)
            engine.observe("flowprefill_time_to_first_token_seconds", 0.35, slo_class=cls)
        for _ in range(met + missed):
            scheduler.observe("flowprefill_request_queue_time_seconds", 0.01, slo_class=cls)
            engine.observe("flowprefill_time_per_output_token_seconds", 0.02, slo_class=cls)
            engine.observe("flowprefill_e2e_request_latency_seconds", 1.0, slo_class=cls)
            decode.observe("flowprefill_inter_token_latency_seconds", 0.02, slo_class=cls)
        for reason, count in reasons.items():
            engine.inc(
                "flowprefill_requests_finished_total", count, slo_class=cls, finish_reason=reason
            )
        if rejected:
            scheduler.inc("flowprefill_requests_rejected_total", rejected, slo_class=cls)
    for size, units in UNIT_SIZES:
        for _ in range(units):
            scheduler.observe("flowprefill_prefill_batch_size", size)
            scheduler.observe("flowprefill_prefill_batch_tokens", size * PROMPT_TOKENS_PER_REQUEST)
            scheduler.observe("flowprefill_ttft_prediction_ratio", 0.97)
            scheduler.observe("flowprefill_scheduler_event_seconds", 0.0002, event="arrival")
    scheduler.inc("flowprefill_prompt_tokens_total", requests * PROMPT_TOKENS_PER_REQUEST)
    scheduler.inc("flowprefill_preemptions_total", worker_id="prefill-0")
    scheduler.observe("flowprefill_preemption_blocking_seconds", 0.0015, worker_id="prefill-0")
    scheduler.set("flowprefill_prefill_requests_waiting", 80 if failing else 3)
    for worker, running in zip(PREFILL_WORKERS, (1, 0), strict=True):
        scheduler.set("flowprefill_prefill_requests_running", running, worker_id=worker)
        scheduler.set("flowprefill_prefill_requests_paused", 0, worker_id=worker)
    prefill = {"worker_id": "prefill-0"}
    scheduler.inc(
        "flowprefill_prefix_cache_query_tokens_total",
        requests * (PROMPT_TOKENS_PER_REQUEST - 1),
        **prefill,
    )
    scheduler.inc(
        "flowprefill_prefix_cache_hit_tokens_total",
        requests * CACHE_HIT_TOKENS_PER_REQUEST,
        **prefill,
    )
    for worker in PREFILL_WORKERS:
        scheduler.set("flowprefill_prefix_cache_bytes", 2**20, worker_id=worker)
    decode.inc("flowprefill_kv_transfer_bytes_total", requests * KV_BYTES_PER_REQUEST)
    for _ in range(requests):
        decode.observe("flowprefill_kv_transfer_seconds", 0.004)
    decode.inc("flowprefill_generation_tokens_total", requests * 16)
    decode.set("flowprefill_decode_batch_size", 8, worker_id="decode-0")
    decode.set("flowprefill_decode_requests_waiting", 40 if failing else 0, worker_id="decode-0")
    decode.set("flowprefill_decode_kv_usage_ratio", 0.3, worker_id="decode-0")


def _every_other_metric(metrics) -> None:
    for spec in METRICS:
        if spec.name in _COVERED:
            continue
        labels = {label: _GENERIC_LABELS.get(label, "x") for label in spec.labels}
        if spec.kind == "counter":
            metrics.inc(spec.name, **labels)
        elif spec.kind == "gauge":
            metrics.set(spec.name, 1.0, **labels)
        else:
            metrics.observe(spec.name, spec.boundaries[0], **labels)
