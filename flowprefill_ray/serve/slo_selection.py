"""Which TTFT SLO a request gets: body extension fields, then headers, then the default class.

A request names a class (``slo_class`` / ``X-SLO-Class``) or an explicit target in
milliseconds (``ttft_slo_ms`` / ``X-TTFT-SLO-Ms``). A body field beats the equivalent header
(the body is the more specific statement). An explicit target keeps the class as the label
for metrics: the named class if one was given, else the default class.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .errors import APIError

SLO_CLASS_HEADER = "x-slo-class"
TTFT_SLO_MS_HEADER = "x-ttft-slo-ms"


@dataclass(frozen=True)
class RequestSLO:
    """The SLO the engine schedules a request by. ``ttft_slo_s`` (seconds) is set only for
    an explicit per-request target; otherwise the class's own target applies."""

    slo_class: str
    ttft_slo_s: float | None = None


def resolve_slo(
    body_class: str | None,
    body_ttft_ms: float | None,
    headers: Mapping[str, str],
    known_classes: Collection[str],
    default_class: str,
) -> RequestSLO:
    """Pick the request's SLO; raise a 400 ``APIError`` for an unknown class or a target that
    is not a positive finite number of milliseconds."""
    slo_class = body_class if body_class is not None else headers.get(SLO_CLASS_HEADER)
    if slo_class is not None and slo_class not in known_classes:
        raise APIError(
            400,
            f"Unknown SLO class {slo_class!r}; known classes: {', '.join(sorted(known_classes))}",
            param="slo_class",
            code="unknown_slo_class",
        )
    ttft_ms = body_ttft_ms
    if ttft_ms is None and TTFT_SLO_MS_HEADER in headers:
        ttft_ms = _parse_ms_header(headers[TTFT_SLO_MS_HEADER])
    return RequestSLO(
        slo_class=slo_class or default_class,
        ttft_slo_s=None if ttft_ms is None else ttft_ms / 1000.0,
    )


def _parse_ms_header(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise APIError(
            400,
            f"Header X-TTFT-SLO-Ms must be a positive number of milliseconds, got {raw!r}",
            param="X-TTFT-SLO-Ms",
            code="invalid_ttft_slo",
        )
    return value
