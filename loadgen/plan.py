"""From a trace to the exact list of requests a run will send, and when.

A plan is deterministic for a given ``ReplayConfig`` (trace, slice, scales, seed) so that two
runs (for instance two scheduling policies) replay the very same requests at the very same
offsets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.workloads import (
    SLOAssignmentConfig,
    TraceRecord,
    Workload,
    assign_slo_classes,
    merge_tenants,
)

from .config import ReplayConfig, parse_trace_spec
from .trace_specs import load_source


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of a run. ``send_at_s``: seconds after the run starts; ``ttft_slo_s``: the
    TTFT target (seconds) the client judges it against."""

    request_id: str
    send_at_s: float
    prompt_tokens: int
    max_output_tokens: int
    slo_class: str
    ttft_slo_s: float
    # The trace's prompt-block hash ids and tokens per block, when it has them: the prompt is
    # then built block by block so requests sharing ids share tokens (loadgen.prompts).
    hash_ids: tuple[int, ...] = ()
    block_tokens: int | None = None


def load_trace_workload(trace: str) -> Workload:
    """A shipped trace by alias (``azure-conv``, ``azure-code``, ``mooncake[block=N]``), the
    generated ``multiturn[...]`` workload or a trace file (``loadgen.trace_specs``); or several
    tenants' traces merged, ``TRACE=CLASS,...`` (``ReplayConfig.trace``)."""
    pairs = parse_trace_spec(trace)
    if pairs[0][1] is None:
        return load_source(trace)
    return merge_tenants([(load_source(name), str(slo_class)) for name, slo_class in pairs])


def shape_workload(workload: Workload, replay: ReplayConfig) -> Workload:
    """Slice, rate-scale, cut to ``max_requests`` and give SLO classes to requests without one.

    Classes are assigned by ``flowprefill_ray.workloads.assign_slo_classes`` (prompt-length
    bands plus a seeded random share) on the sliced trace, before prompts are scaled, so the
    class of a request reflects its original length.
    """
    if replay.start_s > 0:
        end = max((r.arrival_s for r in workload), default=0.0) + 1.0
        workload = workload.window(replay.start_s, max(end, replay.start_s + 1.0))
    workload = workload.head(replay.max_requests).scale_rate(replay.rate_scale)
    return assign_slo_classes(workload, SLOAssignmentConfig(seed=replay.seed))


def scaled_prompt_tokens(record: TraceRecord, replay: ReplayConfig) -> int:
    """The record's prompt length times ``prompt_scale``, clamped to the configured bounds."""
    tokens = max(
        replay.min_prompt_tokens, int(math.ceil(record.prompt_tokens * replay.prompt_scale))
    )
    if replay.max_prompt_tokens is not None:
        tokens = min(tokens, replay.max_prompt_tokens)
    return tokens


def plan_requests(
    workload: Workload, replay: ReplayConfig, ttft_slo_s: Mapping[str, float]
) -> list[PlannedRequest]:
    """The requests to send, in arrival order, with send offsets relative to the first one.

    ``ttft_slo_s`` maps SLO class name -> TTFT target in seconds; a class the mapping lacks is
    an error (the client could not judge the request).
    """
    shaped = shape_workload(workload, replay)
    if not len(shaped):
        return []
    t0 = shaped[0].arrival_s
    plan = []
    for i, record in enumerate(shaped):
        slo_class = record.slo_class or "text"
        if slo_class not in ttft_slo_s:
            raise ValueError(
                f"request {i} has SLO class {slo_class!r} with no TTFT target; "
                f"known classes: {sorted(ttft_slo_s)}"
            )
        output = max(1, record.output_tokens)
        if replay.max_output_tokens is not None:
            output = min(output, replay.max_output_tokens)
        plan.append(
            PlannedRequest(
                request_id=f"req-{i:05d}",
                send_at_s=record.arrival_s - t0,
                prompt_tokens=scaled_prompt_tokens(record, replay),
                max_output_tokens=output,
                slo_class=slo_class,
                ttft_slo_s=float(ttft_slo_s[slo_class]),
                hash_ids=record.hash_ids if shaped.block_tokens else (),
                block_tokens=shaped.block_tokens if record.hash_ids else None,
            )
        )
    return plan


def ttft_targets(slo: SLOConfig) -> dict[str, float]:
    """SLO class name -> TTFT target in seconds, scale applied (what the client judges by)."""
    return {name: slo.resolve(name).ttft_slo_s for name in slo.class_names}
