"""What was measured for one request, on the client's clock.

All times are seconds on one monotonic clock, as offsets from the start of the run, so records
of one run compare directly. Derived latencies are properties, never stored twice.

Definitions (client side, as users experience them):
- TTFT: from the moment the request was sent to the first streamed chunk that carries a
  generated token (a chunk with a choice; the usage-only chunk at the end does not count).
- ITL: gaps between successive token chunks.
- TPOT: (end - first token) / (output tokens - 1): mean time per output token after the first.
- e2e: from sending to the end of the stream.
- SLO met: a first token arrived within the class's TTFT target. A request that failed or was
  rejected before its first token missed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "http_error", "error", "unfinished", "not_sent"]


@dataclass(slots=True)
class RequestResult:
    """One request as the client measured it. (The policy's own per-request state is
    ``flowprefill_ray.scheduling.records.RequestRecord``; this is the other side of the wire.)"""

    request_id: str
    slo_class: str
    ttft_slo_s: float
    prompt_tokens: int
    max_output_tokens: int
    scheduled_s: float
    sent_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    # ``time.time()`` at sending: the only stamp on the host's wall clock, so the client's
    # times line up with the server's per-hop stamps (``server["hops"]``, our server only).
    sent_wall_s: float | None = None
    output_tokens: int = 0
    status: Status = "not_sent"
    http_status: int | None = None
    error: str | None = None
    # Per-request numbers the server reports in a response extension (our server: preemptions,
    # queue_s, ttft_s...); empty for servers that report none.
    server: dict[str, Any] = field(default_factory=dict)

    @property
    def send_lag_s(self) -> float | None:
        """How late the client sent it versus its schedule (open-loop health check)."""
        return None if self.sent_s is None else self.sent_s - self.scheduled_s

    @property
    def ttft_s(self) -> float | None:
        if self.sent_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        if self.sent_s is None or self.end_s is None or self.status != "ok":
            return None
        return self.end_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.status != "ok":
            return None
        if self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def slo_met(self) -> bool:
        ttft = self.ttft_s
        return ttft is not None and ttft <= self.ttft_slo_s

    @property
    def preemptions(self) -> int | None:
        value = self.server.get("preemptions")
        return int(value) if isinstance(value, (int, float)) else None

    # Columns of the per-request CSV, in order.
    CSV_FIELDS = (
        "request_id",
        "slo_class",
        "ttft_slo_s",
        "prompt_tokens",
        "max_output_tokens",
        "output_tokens",
        "status",
        "http_status",
        "scheduled_s",
        "sent_s",
        "send_lag_s",
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "slo_met",
        "preemptions",
        "server_queue_s",
        "error",
    )

    def to_row(self) -> dict[str, Any]:
        """One flat row (CSV columns ``CSV_FIELDS``)."""
        row = {name: getattr(self, name) for name in self.CSV_FIELDS if hasattr(self, name)}
        row["server_queue_s"] = self.server.get("queue_s")
        return row

    def to_json(self) -> dict[str, Any]:
        """The row plus the token timestamps and every server-reported field."""
        data = self.to_row()
        data["first_token_s"] = self.first_token_s
        data["end_s"] = self.end_s
        data["sent_wall_s"] = self.sent_wall_s
        data["token_times_s"] = list(self.token_times_s)
        data["server"] = dict(self.server)
        return data
