"""Requests, SLO classes, the TTFT predictor and scheduling policies (plain Python).

The simulator and the Ray scheduler actor drive the same policy objects: events in
(``events.py``), decisions out, time in seconds on the driver's clock. Both build them with
``make_policy``, here because it is the one place that knows every policy: ``config.py``
cannot hold it, as every policy module imports ``PolicyConfig`` from there.
"""

from .admission import AdmissionConfig, AdmissionControl
from .chunked import ChunkedPolicy
from .config import PolicyConfig
from .edf_giveup import EDFGiveUpPolicy
from .flowprefill import FlowPrefillPolicy
from .kv_memory import KVBudget, KVMemory
from .policy import DecisionCounts, DuplicateArrivalError, Policy
from .predictor import PredictorConfig, TTFTPredictor
from .priority import priority, rank_key, slack_s
from .priority_chunked import PriorityChunkedPolicy
from .records import RequestView
from .request import Request, RequestStatus
from .run_to_completion import EDFPolicy, FCFSPolicy
from .slo import DEFAULT_SLO_CONFIG, SLOClass, SLOConfig, UnknownSLOClassError
from .srpf import SRPFPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        FlowPrefillPolicy,
        FCFSPolicy,
        ChunkedPolicy,
        EDFPolicy,
        SRPFPolicy,
        PriorityChunkedPolicy,
        EDFGiveUpPolicy,
    )
}


def make_policy(
    config: PolicyConfig,
    predictor: TTFTPredictor,
    slo: SLOConfig | None = None,
) -> Policy:
    """A fresh policy named by ``config.name``. ``slo`` (default ``DEFAULT_SLO_CONFIG``) gives
    the classes admission control may downgrade a request to; pass the SLO configuration the
    requests were stamped with (``Request.with_slo``). Each worker's KV memory budget comes
    with its ``WorkerJoined`` event (``kv_memory.py``)."""
    try:
        cls = POLICIES[config.name]
    except KeyError:
        raise ValueError(
            f"policy {config.name!r} is not available; available: {sorted(POLICIES)}"
        ) from None
    return cls(config, predictor, slo)


__all__ = [
    "DEFAULT_SLO_CONFIG",
    "AdmissionConfig",
    "AdmissionControl",
    "ChunkedPolicy",
    "POLICIES",
    "DecisionCounts",
    "DuplicateArrivalError",
    "EDFGiveUpPolicy",
    "EDFPolicy",
    "FCFSPolicy",
    "FlowPrefillPolicy",
    "KVBudget",
    "KVMemory",
    "Policy",
    "PolicyConfig",
    "PredictorConfig",
    "PriorityChunkedPolicy",
    "Request",
    "RequestStatus",
    "RequestView",
    "SLOClass",
    "SLOConfig",
    "SRPFPolicy",
    "TTFTPredictor",
    "UnknownSLOClassError",
    "make_policy",
    "priority",
    "rank_key",
    "slack_s",
]
