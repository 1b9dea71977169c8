"""Every metric of the system, in one registry, emitted through ``ray.util.metrics``.

``METRICS`` is the single source of truth: the actors emit only names listed here, and the
Grafana dashboard, alert rules and tests read the same list. Names follow vLLM's conventions
with a ``flowprefill_`` prefix and the unit in the name (``_seconds``, ``_bytes``, ``_total``).
Ray's metrics agent exports each one as ``ray_<name>`` (histograms as ``_bucket``/``_sum``/
``_count``), with our labels beside Ray's own (WorkerId, NodeAddress, ...).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]

# TTFT SLOs go down to a few tens of ms on GPU, so the buckets are fine below 100 ms.
TTFT_BUCKETS_S = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
)
TOKEN_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# Preemption blocking is at most one block's compute: tens of microseconds to tens of ms.
BLOCKING_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.0045,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
)
SCHEDULER_BUCKETS_S = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
# Batch sizes are integers: boundaries halfway between them put each size k in its own bucket
# (k - 0.5, k + 0.5], so histogram_quantile's linear interpolation inside a bucket stays within
# 0.5 of k (and round() gives k). With boundaries on the integers (1, 2, ...) every unit of one
# request sat in (0, 1] and the median read as a fraction (0.62).
BATCH_SIZE_BUCKETS = (
    0.5,
    1.5,
    2.5,
    3.5,
    4.5,
    5.5,
    6.5,
    7.5,
    8.5,
    12.5,
    16.5,
    24.5,
    32.5,
    48.5,
    64.5,
    128.5,
    256.5,
)
BATCH_TOKENS_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# observed / predicted prefill time: 1.0 is a perfect prediction.
PREDICTION_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)
TRANSFER_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# finish_reason values of flowprefill_requests_finished_total: the stream's own reasons, plus
# "timeout" for a request past its end-to-end bound (RequestTimeoutError, HTTP 504). "error" is
# any other failure the client sees (a worker died, the scheduler is restarting: 500/503).
FINISH_REASONS = ("stop", "length", "abort", "error", "timeout")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its exported base name, kind, help text, label names and buckets."""

    name: str
    kind: MetricKind
    description: str
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    # --- request latency, by SLO class (emitted by the engine when a request finishes)
    MetricSpec(
        "flowprefill_time_to_first_token_seconds",
        "histogram",
        "Time from the request's arrival (at the ingress, else at submit) to its first token "
        "there, seconds (the one TTFT clock the SLO counters judge).",
        ("slo_class",),
        TTFT_BUCKETS_S,
    ),
    MetricSpec(
        "flowprefill_time_per_output_token_seconds",
        "histogram",
        "Mean time per output token after the first, per request, seconds.",
        ("slo_class",),
        TOKEN_LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "flowprefill_inter_token_latency_seconds",
        "histogram",
        "Gap between consecutive tokens a decode worker makes for a request (the first "
        "measured from its admission), seconds.",
        ("slo_class",),
        TOKEN_LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "flowprefill_e2e_request_latency_seconds",
        "histogram",
        "Time from submit at the engine to the last token there, seconds.",
        ("slo_class",),
        E2E_BUCKETS_S,
    ),
    MetricSpec(
        "flowprefill_request_queue_time_seconds",
        "histogram",
        "Time from arrival at the scheduler until the request's prefill first ran, seconds.",
        ("slo_class",),
        TTFT_BUCKETS_S,
    ),
    MetricSpec(
        "flowprefill_slo_met_total",
        "counter",
        "Requests whose first token came within their TTFT SLO (the server TTFT: arrival at the "
        "ingress to the first token there; the API's slo_met).",
        ("slo_class",),
    ),
    MetricSpec(
        "flowprefill_slo_missed_total",
        "counter",
        "Requests whose first token came after their TTFT SLO (the server TTFT: arrival at the "
        "ingress to the first token there; the API's slo_met).",
        ("slo_class",),
    ),
    MetricSpec(
        "flowprefill_requests_finished_total",
        "counter",
        "Finished requests by finish reason (stop, length, abort, error, timeout).",
        ("slo_class", "finish_reason"),
    ),
    MetricSpec(
        "flowprefill_requests_rejected_total",
        "counter",
        "Requests refused with HTTP 429: by admission control (scheduler) or at the engine's "
        "in-flight bound.",
        ("slo_class",),
    ),
    MetricSpec(
        "flowprefill_requests_downgraded_total",
        "counter",
        "Requests admission control moved to a looser SLO class instead of rejecting them "
        "(slo_class: the class asked for; served_class: the class served).",
        ("slo_class", "served_class"),
    ),
    MetricSpec(
        "flowprefill_requests_overtaken_total",
        "counter",
        "Admitted requests demoted behind a tighter class's arrival (admission.overtake_looser): "
        "still served, still judged by their own class's target (slo_class: theirs).",
        ("slo_class",),
    ),
    MetricSpec("flowprefill_prompt_tokens_total", "counter", "Prompt tokens prefilled.", ()),
    MetricSpec("flowprefill_generation_tokens_total", "counter", "Tokens generated.", ()),
    # --- prefill scheduling (scheduler actor)
    MetricSpec(
        "flowprefill_prefill_requests_waiting",
        "gauge",
        "Requests waiting for a prefill worker (global queue).",
        (),
    ),
    MetricSpec(
        "flowprefill_prefill_requests_running",
        "gauge",
        "Requests in the unit a prefill worker is executing.",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_prefill_requests_paused",
        "gauge",
        "Requests in paused units held by a prefill worker.",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_prefill_held_bytes",
        "gauge",
        "Bytes a prefill worker holds between units: paused units' activations and KV, and "
        "finished KV waiting for its decode hand-off. 0 when idle; growth while idle is a leak.",
        ("worker_id",),
    ),
    # --- prefix cache, per prefill worker (docs/RUNTIME.md, "Prefix cache")
    MetricSpec(
        "flowprefill_prefix_cache_query_tokens_total",
        "counter",
        "Prompt tokens looked up in a prefill worker's prefix cache (every prompt token but "
        "the last, which is always computed).",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens served from a prefill worker's prefix cache instead of being computed.",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_prefix_cache_bytes",
        "gauge",
        "Bytes of KV blocks in a prefill worker's prefix cache (kept apart from held_bytes).",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_preemptions_total",
        "counter",
        "Prefill units paused at a checkpoint by a preemption.",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_preemption_blocking_seconds",
        "histogram",
        "Time from a preempt call reaching the worker to the prefill stopping, seconds.",
        ("worker_id",),
        BLOCKING_BUCKETS_S,
    ),
    MetricSpec(
        "flowprefill_prefill_batch_size",
        "histogram",
        "Requests per prefill work unit.",
        (),
        BATCH_SIZE_BUCKETS,
    ),
    MetricSpec(
        "flowprefill_prefill_batch_tokens",
        "histogram",
        "Prompt tokens per prefill work unit.",
        (),
        BATCH_TOKENS_BUCKETS,
    ),
    MetricSpec(
        "flowprefill_ttft_prediction_ratio",
        "histogram",
        "Observed / predicted compute time of a completed prefill unit.",
        (),
        PREDICTION_RATIO_BUCKETS,
    ),
    MetricSpec(
        "flowprefill_scheduler_event_seconds",
        "histogram",
        "Scheduler time per event: policy.on_event plus dispatching decisions, seconds.",
        ("event",),
        SCHEDULER_BUCKETS_S,
    ),
    # --- KV transfer prefill -> decode (decode worker, on receipt)
    MetricSpec(
        "flowprefill_kv_transfer_bytes_total",
        "counter",
        "KV cache bytes moved from prefill to decode workers.",
        (),
    ),
    MetricSpec(
        "flowprefill_kv_transfer_seconds",
        "histogram",
        "Time to fetch one request's KV cache into a decode worker, seconds.",
        (),
        TRANSFER_BUCKETS_S,
    ),
    # --- decode (decode worker)
    MetricSpec(
        "flowprefill_decode_batch_size",
        "gauge",
        "Sequences in a decode worker's current step.",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_decode_requests_waiting",
        "gauge",
        "Requests handed to a decode worker that wait for KV blocks.",
        ("worker_id",),
    ),
    MetricSpec(
        "flowprefill_decode_kv_usage_ratio",
        "gauge",
        "Fraction of a decode worker's KV blocks in use (0..1).",
        ("worker_id",),
    ),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


class RuntimeMetrics:
    """Emits the registry's metrics from the current process (an actor or the driver).

    Ray metric objects are created on first use, so importing this module needs no Ray.
    Unknown names and wrong label sets raise at once: a typo must not silently drop a series.
    """

    def __init__(self) -> None:
        self._made: dict[str, object] = {}

    def _metric(self, name: str, kind: MetricKind, labels: dict[str, str]):
        spec = METRICS_BY_NAME.get(name)
        if spec is None:
            raise KeyError(f"metric {name!r} is not in flowprefill_ray.runtime.metrics.METRICS")
        if spec.kind != kind:
            raise TypeError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        if set(labels) != set(spec.labels):
            raise ValueError(f"metric {name!r} takes labels {spec.labels}, got {tuple(labels)}")
        made = self._made.get(name)
        if made is None:
            from ray.util import metrics as ray_metrics

            if kind == "counter":
                made = ray_metrics.Counter(name, spec.description, tag_keys=spec.labels)
            elif kind == "gauge":
                made = ray_metrics.Gauge(name, spec.description, tag_keys=spec.labels)
            else:
                made = ray_metrics.Histogram(
                    name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.labels
                )
            self._made[name] = made
        return made

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value > 0:
            self._metric(name, "counter", labels).inc(value, tags=labels or None)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, "gauge", labels).set(value, tags=labels or None)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, "histogram", labels).observe(value, tags=labels or None)

    def zero_init(self, **label_values: Iterable[str]) -> None:
        """Create counter series at 0 so they exist from start-up, not from their first event.

        To PromQL a missing series is not 0: ``met / (met + missed)`` drops a class that never
        missed, and a rejections panel stays empty until the first rejection. Every counter
        whose labels all have values in ``label_values`` (``finish_reason`` defaults to
        FINISH_REASONS) gets one series per combination; unlabelled counters get theirs.
        Calling it again, or from several processes, adds nothing (each adds 0).
        """
        values = {"finish_reason": FINISH_REASONS, **{k: tuple(v) for k, v in label_values.items()}}
        for spec in METRICS:
            if spec.kind != "counter" or not set(spec.labels) <= set(values):
                continue
            for combination in itertools.product(*(values[label] for label in spec.labels)):
                labels = dict(zip(spec.labels, combination, strict=True))
                # Ray's Counter.inc refuses 0; recording 0 creates the series without moving it
                # (Ray 2.60's exporter then shows it with value 0.0).
                self._metric(spec.name, "counter", labels)._record(0.0, tags=labels or None)
