"""Requests, SLO classes, the TTFT predictor and scheduling policies (plain Python).

The simulator and the Ray scheduler actor drive the same policy objects: events in
(``events.py``), decisions out, time in seconds on the driver's clock.
"""

from .admission import AdmissionConfig, AdmissionControl
from .chunked import ChunkedPolicy
from .config import PolicyConfig
from .edf import EDFPolicy
from .fcfs import FCFSPolicy
from .flowprefill import FlowPrefillPolicy
from .policies import POLICIES, make_policy
from .policy import DecisionCounts, DuplicateRequestError, KVCheck, Policy
from .predictor import PredictorConfig, TTFTPredictor
from .priority import priority, rank_key, slack_s
from .records import RequestView
from .request import Request, RequestStatus
from .slo import DEFAULT_SLO_CONFIG, SLOClass, SLOConfig, UnknownSLOClassError

__all__ = [
    "DEFAULT_SLO_CONFIG",
    "AdmissionConfig",
    "AdmissionControl",
    "ChunkedPolicy",
    "POLICIES",
    "DecisionCounts",
    "DuplicateRequestError",
    "EDFPolicy",
    "FCFSPolicy",
    "FlowPrefillPolicy",
    "KVCheck",
    "Policy",
    "PolicyConfig",
    "PredictorConfig",
    "Request",
    "RequestStatus",
    "RequestView",
    "SLOClass",
    "SLOConfig",
    "TTFTPredictor",
    "UnknownSLOClassError",
    "make_policy",
    "priority",
    "rank_key",
    "slack_s",
]
