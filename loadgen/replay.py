"""One replay from configs to results: load the trace, plan it, run it open loop."""

from __future__ import annotations

from flowprefill_ray.scheduling.slo import SLOConfig

from .config import EndpointConfig, ReplayConfig
from .plan import load_trace_workload, plan_requests, ttft_targets
from .runner import RunResult, run_open_loop


async def replay_trace(
    endpoint: EndpointConfig,
    replay: ReplayConfig,
    slo: SLOConfig | None = None,
    progress: bool = True,
) -> RunResult:
    """Replay ``replay.trace`` against ``endpoint``; requests are judged against ``slo``'s
    TTFT targets (scale included; default: the paper's four classes at scale 1)."""
    slo = slo or SLOConfig()
    workload = load_trace_workload(replay.trace)
    plan = plan_requests(workload, replay, ttft_targets(slo))
    return await run_open_loop(endpoint, replay, plan, progress=progress)
