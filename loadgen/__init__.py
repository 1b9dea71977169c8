"""Open-loop load generator for OpenAI-compatible endpoints (ours, vLLM, SGLang).

It replays a request trace at scheduled times (open loop), streams every answer, and measures on
the client side TTFT, TPOT, ITL and end-to-end latency, judging TTFT against per-class SLOs.
``python -m loadgen run --help`` for the command line; ``replay_trace`` for the Python API.
"""

from .config import EndpointConfig, ReplayConfig
from .output import write_results
from .plan import PlannedRequest, load_trace_workload, plan_requests, ttft_targets
from .replay import replay_trace
from .result import RequestResult
from .runner import RunResult, run_open_loop
from .summary import format_report, summarize

__all__ = [
    "EndpointConfig",
    "PlannedRequest",
    "ReplayConfig",
    "RequestResult",
    "RunResult",
    "format_report",
    "load_trace_workload",
    "plan_requests",
    "replay_trace",
    "run_open_loop",
    "summarize",
    "ttft_targets",
    "write_results",
]
