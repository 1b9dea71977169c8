"""The Ray runtime: scheduler actor, prefill and decode worker actors, and the client API.

``FlowPrefillEngine`` (engine.py) is the entry point; ``RuntimeConfig`` (config.py) configures
it; the errors in errors.py carry the HTTP status a front end should answer with; metrics.py
lists every metric the system exports. See docs/RUNTIME.md.
"""

from flowprefill_ray.errors import (
    DuplicateRequestError,
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
    RequestRejectedError,
    RuntimeEngineError,
)

from .config import (
    DecodeConfig,
    KVTransferConfig,
    ModelSource,
    PlacementConfig,
    PrefillConfig,
    RequestBounds,
    RuntimeConfig,
)
from .engine import FlowPrefillEngine
from .metrics import METRICS, METRICS_BY_NAME, MetricSpec, RuntimeMetrics
from .request_stream import RequestStream, TokenOutput

__all__ = [
    "METRICS",
    "METRICS_BY_NAME",
    "DecodeConfig",
    "DuplicateRequestError",
    "EngineUnavailableError",
    "FlowPrefillEngine",
    "InvalidRequestError",
    "KVTransferConfig",
    "MetricSpec",
    "ModelSource",
    "PlacementConfig",
    "PrefillConfig",
    "PromptTooLongError",
    "RequestBounds",
    "RequestFailedError",
    "RequestRejectedError",
    "RequestStream",
    "RuntimeConfig",
    "RuntimeEngineError",
    "RuntimeMetrics",
    "TokenOutput",
]
