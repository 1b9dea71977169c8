"""One request's clock: where its TTFT starts, and when it passed each hop to its first token.

The server's TTFT of a request is measured once, on one clock: ``time.monotonic()`` of the
process that received it (the Serve ingress, or the caller of ``FlowPrefillEngine.submit``),
from ``RequestClock.started_s`` (the HTTP request reached the ingress; else the ``submit``
call) to the first token arriving back there. The SLO counters, ``TokenOutput.ttft_s`` and
``slo_met`` and the API's ``flowprefill`` field all read that one number (docs/RUNTIME.md,
"One TTFT clock").

Beside it, the request carries wall-clock stamps (``time.time()``, seconds) of the hops on
its first-token path, named in ``HOPS`` in path order; each process stamps its own hops and
the scheduler's travel back with the first token (``PrefillDone.hops``). Stamps from different
processes compare only on one host (one clock); across nodes they include clock skew. A
handful of floats per request, no prompt text.
"""

from __future__ import annotations

import time

# The first-token path in order. Not every request passes every hop: one that ends with its
# first token has no ``decode_handoff``; one sent through the Python API has no
# ``http_received`` or ``first_chunk``.
HOPS = (
    "http_received",  # the ingress's route handler got the request (before reading the body)
    "engine_submit",  # FlowPrefillEngine.submit: tokenized and validated, about to call
    "scheduler_arrival",  # the scheduler actor's submit began
    "unit_dispatch",  # the scheduler issued the run call of the request's first unit
    "worker_start",  # the prefill worker's compute thread began that unit
    "worker_end",  # the unit that produced the first token ended on the worker
    "scheduler_first_token",  # the scheduler received that unit's outcome
    "decode_handoff",  # the scheduler issued the hand-off to a decode worker
    "engine_first_token",  # the first token reached the engine (the scheduler's answer)
    "first_chunk",  # the ingress built the first response chunk (SSE) or the whole body
)
# A client's own stamps around the server's (same host, same wall clock): sending, and the
# first token arriving. Benchmarks and the load generator add them to a request's hops.
CLIENT_SENT = "client_sent"
CLIENT_RECEIVED = "client_received"
# The whole path as a client sees it, in order.
CLIENT_PATH = (CLIENT_SENT, *HOPS, CLIENT_RECEIVED)


def hop_segments(hops: dict[str, float]) -> dict[str, float]:
    """Seconds between consecutive stamps of ``hops`` in path order (a client's stamps
    included), named ``"a->b"``; hops a request did not pass are skipped."""
    path = [h for h in CLIENT_PATH if h in hops]
    return {f"{a}->{b}": hops[b] - hops[a] for a, b in zip(path, path[1:], strict=False)}


class RequestClock:
    """``started_s``: ``time.monotonic()`` at which the request's TTFT starts (default: now).
    ``first_hop``: the name of a hop to stamp at creation (``HOPS``), if any."""

    __slots__ = ("started_s", "hops")

    def __init__(self, first_hop: str | None = None, started_s: float | None = None):
        self.started_s = time.monotonic() if started_s is None else started_s
        self.hops: dict[str, float] = {} if first_hop is None else {first_hop: time.time()}

    def mark(self, hop: str) -> None:
        """Stamp ``hop`` now (wall clock)."""
        self.hops[hop] = time.time()

    def elapsed_s(self) -> float:
        """Seconds since the TTFT started, on the monotonic clock."""
        return time.monotonic() - self.started_s
