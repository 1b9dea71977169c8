"""Plain data passed between the runtime's actors and the client (pickled by Ray).

Only small things travel in these messages: token ids, timings, ids. KV tensors never do; they
move prefill worker -> decode worker through an ObjectRef (see ``kv_handoff``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flowprefill_ray.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True, slots=True)
class PrefillItemSpec:
    """One work item as a prefill worker receives it: prompt tokens ``[start, end)`` of a
    request, the token ids of exactly that range, and what it needs to sample the first token
    when ``end`` is the end of the prompt."""

    request_id: str
    start: int
    end: int
    token_ids: tuple[int, ...]
    prompt_tokens: int
    sampling: SamplingParams
    # The request's prefix-cache salt: it shares cached KV only with requests of equal salt.
    cache_salt: str | None = None
    # Tokens [0, start), sent when the policy started a whole prompt at the prefix it believes
    # the worker has cached (policy.prefix): a worker holding no partial KV for the request
    # takes that prefix from its cache, and computes whatever of it is no longer there.
    prefix_token_ids: tuple[int, ...] = ()

    @property
    def is_last(self) -> bool:
        return self.end == self.prompt_tokens


@dataclass(frozen=True, slots=True)
class FirstToken:
    """What a completed prefill produced for one request (its KV stays on the worker until a
    decode worker takes it). ``generator_state`` is the sampler RNG state after drawing the
    first token, so seeded decoding continues the same random stream on the decode worker."""

    request_id: str
    token_id: int
    kv_tokens: int
    kv_bytes: int
    generator_state: bytes | None = None
    # Decided once, here on the prefill worker (output_rules.py): set when the request ends
    # with this token (EOS, max_tokens=1, a stop string; then no decode); whether the token is
    # part of the output (not an EOS, not the end of a stop string); the text it shows.
    finish_reason: FinishReason | None = None
    shown: bool = True
    text: str = ""


@dataclass(frozen=True, slots=True)
class FailedItem:
    """A request whose prefill failed inside a unit that otherwise went on (its forward or its
    first-token sampling raised). ``detail`` is for the server log, never for the client."""

    request_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class UnitOutcome:
    """How one ``run``/``resume`` call of a prefill worker ended.

    ``executed_s``: compute seconds of the unit over all its runs; ``blocking_s``: for a
    paused unit, seconds from the preempt call reaching the worker to the stop; ``block_s``:
    the block the preempt had to wait for (previous checkpoint to the stop), seconds;
    ``started_wall_s``: ``time.time()`` when this run began computing on the worker;
    ``cached_tokens``: ``(request_id, tokens)`` for each item of a completed unit whose first
    tokens came from the worker's prefix cache instead of being computed;
    ``ended_wall_s``: when it ended there (stamped by the worker actor as the call returns).
    """

    unit_id: int
    status: Literal["completed", "paused", "discarded"]
    executed_s: float
    blocking_s: float = 0.0
    first_tokens: tuple[FirstToken, ...] = ()
    block_s: float = 0.0
    failed: tuple[FailedItem, ...] = ()
    started_wall_s: float = 0.0
    cached_tokens: tuple[tuple[str, int], ...] = ()
    ended_wall_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Handoff:
    """A request moving to a decode worker, sent with the ObjectRef of its KV."""

    request_id: str
    first_token: int
    prompt_tokens: int
    sampling: SamplingParams
    slo_class: str
    generator_state: bytes | None = None
    # Wall-clock time (time.time(), seconds) the scheduler issued the hand-off: with Ray Direct
    # Transport the tensors arrive already resolved, so the transfer is timed from here.
    sent_at_wall_s: float = 0.0
    # The ingress client that submitted it (EngineRequest.client_id): its lease expiring
    # cancels the request here too.
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class AcceptAck:
    """A decode worker's answer to a hand-off: transfer cost and its load afterwards."""

    request_id: str
    kv_bytes: int
    transfer_s: float
    running: int
    waiting: int
    kv_usage: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token as the decode worker streams it. ``index`` counts output tokens
    from 0 (the first token, produced by prefill, is index 0). ``text`` is the text delta."""

    request_id: str
    token_id: int | None
    index: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The scheduler's answer to ``submit``: the first token is ready. ``decode_worker_id``
    names the decode worker that continues the request (None when the request finished with
    its first token). ``queue_s``: seconds from arrival at the scheduler to the first run. The
    TTFT judged against the SLO is measured by the engine alone (request_clock.py).

    An id, not the actor handle: a handle serialised into every answer leaked ~0.6 KiB of
    native memory per request in the scheduler actor (Ray's handle reference counting; 30,000
    answers: +19.8 MiB with the handle, +2.7 MiB with an id)."""

    request_id: str
    first_token: int
    finish_reason: FinishReason | None
    decode_worker_id: str | None
    queue_s: float
    preemptions: int
    ttft_slo_s: float
    slo_class: str  # the class it was served under (admission control may have downgraded it)
    requested_slo_class: str | None = None  # set when that differs from the class asked for
    # Wall-clock stamps (time.time(), s) of the hops passed so far (request_clock.HOPS).
    hops: dict[str, float] | None = None
    # As the prefill worker decided (FirstToken): whether the first token is part of the
    # output, and the text it shows.
    first_shown: bool = True
    first_text: str = ""
