"""A prefill request as the scheduler sees it, and the statuses a policy tracks it through."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat

from .slo import DEFAULT_SLO_CONFIG, SLOConfig


class RequestStatus(str, Enum):
    """Where a request is in a policy's view.

    PAUSED covers both a preempted unit holding the request's state and, in chunked prefill,
    a request whose earlier chunks are done and whose KV waits on a worker for the next chunk.
    """

    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.CANCELLED)


class Request(BaseModel):
    """One request's scheduling facts. Times are seconds on the policy driver's clock.

    The TTFT target is ``ttft_slo_s`` when given (it overrides the class), otherwise the
    class's target in the default ``SLOConfig`` (scale 1). To evaluate under another SLO
    configuration (a scale sweep, custom classes), stamp requests with
    ``request.with_slo(config)`` where they are created, so that the policy, the simulator
    and the metrics all read one ``deadline_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(min_length=1)
    arrival_s: NonNegativeFloat
    prompt_tokens: int = Field(ge=1)
    max_output_tokens: int = Field(1, ge=1)
    slo_class: str = DEFAULT_SLO_CONFIG.default_class
    ttft_slo_s: PositiveFloat | None = Field(
        None, description="explicit TTFT target, seconds; overrides the class"
    )
    priority: int = Field(0, description="larger is more important; a tie-breaker only")
    prefix_hashes: tuple[int, ...] = Field(
        (),
        description="chained hashes of the prompt's full blocks (prefix_blocks.py), for "
        "prefix-cache pricing and routing; empty = unknown",
    )

    @property
    def ttft_target_s(self) -> float:
        """The TTFT target in force, seconds (explicit, else the default config's class)."""
        if self.ttft_slo_s is not None:
            return self.ttft_slo_s
        return DEFAULT_SLO_CONFIG.resolve(self.slo_class).ttft_slo_s

    @property
    def deadline_s(self) -> float:
        """Absolute time by which the first token is due: ``arrival_s + ttft_target_s``."""
        return self.arrival_s + self.ttft_target_s

    def with_slo(self, slo: SLOConfig) -> Request:
        """A copy whose ``ttft_slo_s`` is fixed from ``slo`` (explicit targets are kept).

        Raises ``UnknownSLOClassError`` if ``slo`` does not define this request's class.
        """
        if self.ttft_slo_s is not None:
            return self
        return self.model_copy(update={"ttft_slo_s": slo.resolve(self.slo_class).ttft_slo_s})
