"""Building a policy from its configuration."""

from __future__ import annotations

from .chunked import ChunkedPolicy
from .config import PolicyConfig
from .edf import EDFPolicy
from .fcfs import FCFSPolicy
from .flowprefill import FlowPrefillPolicy
from .policy import KVCheck, Policy
from .predictor import TTFTPredictor
from .slo import SLOConfig

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FlowPrefillPolicy, FCFSPolicy, ChunkedPolicy, EDFPolicy)
}


def make_policy(
    config: PolicyConfig,
    predictor: TTFTPredictor,
    kv_check: KVCheck | None = None,
    slo: SLOConfig | None = None,
) -> Policy:
    """A fresh policy named by ``config.name``. ``kv_check(worker_id, tokens)``, if given,
    vetoes units a worker has no KV memory for. ``slo`` (default ``DEFAULT_SLO_CONFIG``) gives
    the classes admission control may downgrade a request to; pass the SLO configuration the
    requests were stamped with (``Request.with_slo``)."""
    try:
        cls = POLICIES[config.name]
    except KeyError:
        raise ValueError(
            f"policy {config.name!r} is not available; available: {sorted(POLICIES)}"
        ) from None
    return cls(config, predictor, kv_check, slo)
