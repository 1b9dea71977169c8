"""Which TTFT SLO an HTTP request asks for: body extension fields, then headers.

A request names a class (``slo_class`` / ``X-SLO-Class``) or an explicit target in
milliseconds (``ttft_slo_ms`` / ``X-TTFT-SLO-Ms``). A body field beats the equivalent header
(the body is the more specific statement). This module only reads what was asked; whether the
class exists, the default class and the target in force are decided once, with every other
bound, by ``RequestLimits.build`` (engine_request.py). An explicit target keeps the class as
the label for metrics: the named class if one was given, else the default class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import APIError

SLO_CLASS_HEADER = "x-slo-class"
TTFT_SLO_MS_HEADER = "x-ttft-slo-ms"


@dataclass(frozen=True)
class RequestSLO:
    """The SLO a request asks for: a class name (None: the default class) and an explicit
    TTFT target in seconds (None: the class's own)."""

    slo_class: str | None = None
    ttft_slo_s: float | None = None


def resolve_slo(
    body_class: str | None, body_ttft_ms: float | None, headers: Mapping[str, str]
) -> RequestSLO:
    """Read the SLO the request asks for; raise a 400 ``APIError`` for an ``X-TTFT-SLO-Ms``
    header that is not a positive finite number of milliseconds (the body field is checked by
    its schema)."""
    slo_class = body_class if body_class is not None else headers.get(SLO_CLASS_HEADER)
    ttft_ms = body_ttft_ms
    if ttft_ms is None and TTFT_SLO_MS_HEADER in headers:
        ttft_ms = _parse_ms_header(headers[TTFT_SLO_MS_HEADER])
    return RequestSLO(
        slo_class=slo_class,
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
