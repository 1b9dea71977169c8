"""Turning trace records into ``flowprefill_ray.scheduling.Request`` objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .trace import Workload

if TYPE_CHECKING:
    from flowprefill_ray.scheduling import Request, SLOConfig


def to_requests(
    workload: Workload,
    slo_config: SLOConfig | None = None,
    id_prefix: str | None = None,
    default_class: str = "text",
) -> list[Request]:
    """One ``Request`` per record, in arrival order, ids ``{id_prefix}-{index}``.

    Records without an SLO class get ``default_class``. With ``slo_config`` the request's
    ``ttft_slo_s`` (seconds) is fixed from that config (its class targets times its scale);
    without it, the request carries only its class and the policy's own SLO config applies.
    """
    from flowprefill_ray.scheduling import Request

    prefix = id_prefix if id_prefix is not None else workload.name
    requests = []
    for i, record in enumerate(workload):
        slo_class = record.slo_class or default_class
        extra = {}
        if slo_config is not None:
            extra["ttft_slo_s"] = slo_config.resolve(slo_class).ttft_slo_s
        requests.append(
            Request(
                request_id=f"{prefix}-{i}",
                arrival_s=record.arrival_s,
                prompt_tokens=record.prompt_tokens,
                max_output_tokens=max(1, record.output_tokens),
                slo_class=slo_class,
                **extra,
            )
        )
    return requests
