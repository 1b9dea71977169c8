"""What the load generator talks to and how hard it pushes: one pydantic model per concern.

``EndpointConfig``: where the OpenAI-compatible server is and how to call it.
``ReplayConfig``: which trace, how it is reshaped (rate scale, prompt scale) and the bounds of
a run (request count, wall-clock duration). Both are validated once, at the CLI or API edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .trace_specs import BUILTIN_TRACE_ALIASES, check_source, split_outside_brackets

__all__ = ["BUILTIN_TRACE_ALIASES", "EndpointConfig", "ReplayConfig", "parse_trace_spec"]


class EndpointConfig(BaseModel):
    """An OpenAI-compatible HTTP endpoint (ours, vLLM, SGLang...).

    ``base_url``: scheme, host and port, with or without a trailing ``/v1``.
    ``api``: ``completions`` sends the prompt as a list of token ids, so its length in tokens is
    exact whatever the tokenizer; ``chat`` sends text and its token count is approximate.
    ``api_key``: sent as ``Authorization: Bearer`` when set.
    ``request_timeout_s``: seconds one request may take end to end before it counts as failed.
    ``send_slo``: send the SLO class as the ``slo_class`` body field and ``X-SLO-Class`` header
    (servers that do not know them ignore both).
    ``ignore_eos``: ask the server to generate exactly ``max_tokens`` (vLLM's extension field;
    others ignore it).
    ``priority``: SLO class -> integer sent as the body's ``priority`` field (vLLM's extension,
    honoured under ``--scheduling-policy priority``: lower is served first); ``None`` sends no
    such field. A run whose plan has a class missing here is refused before anything is sent.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    model: str
    api: Literal["completions", "chat"] = "completions"
    api_key: str | None = None
    request_timeout_s: float = Field(default=300.0, gt=0)
    send_slo: bool = True
    ignore_eos: bool = False
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    priority: dict[str, int] | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        url = url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def path(self) -> str:
        return "/v1/completions" if self.api == "completions" else "/v1/chat/completions"


class ReplayConfig(BaseModel):
    """A trace replay.

    ``trace``: ``azure-conv``, ``azure-code`` (the shipped Azure 2023 traces), ``mooncake``
    or ``mooncake[block=N]`` (the shipped Mooncake synthetic trace, prompt blocks rescaled to
    N tokens), ``multiturn[conversations=8,turns=4,...]`` (generated multi-turn chat), or a
    path to a normalized CSV (``arrival_s,input_tokens,output_tokens``) or a Mooncake JSONL
    (``loadgen.trace_specs``); or several tenants at once, ``TRACE=CLASS,TRACE=CLASS`` (e.g. ``azure-conv=urgent,azure-code=relaxed``): each trace's
    requests all get that SLO class and the traces are interleaved by arrival
    (``flowprefill_ray.workloads.merge_tenants``).
    ``start_s``: skip the trace's first seconds (a later slice of the day).
    ``rate_scale``: arrival-gap compression (2 = twice the trace's request rate).
    ``prompt_scale``: multiplies every prompt length (e.g. 0.1 to fit a CPU; for a trace with
    hash ids prefer ``[block=N]``, which keeps whole blocks shared), then
    ``min_prompt_tokens`` / ``max_prompt_tokens`` clamp it; ``max_output_tokens`` caps answers.
    ``max_requests`` and ``duration_s``: the run sends at most that many requests and none
    after ``duration_s`` seconds; once sending is over, in-flight requests get ``drain_s`` more
    seconds before they are cancelled and recorded as unfinished, so a run always ends by
    itself, within ``duration_s + drain_s``.
    ``seed``: fixes the prompt token ids and the SLO classes given to a trace without classes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    trace: str = "azure-conv"
    start_s: float = Field(default=0.0, ge=0.0)
    rate_scale: float = Field(default=1.0, gt=0)
    prompt_scale: float = Field(default=1.0, gt=0)
    min_prompt_tokens: int = Field(default=1, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_requests: int = Field(default=1000, ge=1)
    duration_s: float = Field(default=600.0, gt=0)
    drain_s: float = Field(default=60.0, ge=0)
    seed: int = 0
    # Token ids are drawn from this half-open range: high enough to skip the special tokens
    # most vocabularies put first, low enough to exist in small test vocabularies.
    token_id_low: int = Field(default=16, ge=0)
    token_id_high: int = Field(default=256, ge=1)

    @field_validator("trace")
    @classmethod
    def _trace_spec(cls, trace: str) -> str:
        parse_trace_spec(trace)  # raises ValueError naming what is wrong
        return trace

    @model_validator(mode="after")
    def _consistent_bounds(self) -> ReplayConfig:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < self.min_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) < min_prompt_tokens "
                f"({self.min_prompt_tokens})"
            )
        if self.token_id_high <= self.token_id_low:
            raise ValueError(f"token id range [{self.token_id_low}, {self.token_id_high}) is empty")
        return self


def parse_trace_spec(trace: str) -> list[tuple[str, str | None]]:
    """``(trace, slo_class)`` pairs of a ``--trace`` value: one pair with no class for a
    single trace, one per tenant for ``TRACE=CLASS,TRACE=CLASS``. Each trace is checked
    (``loadgen.trace_specs.check_source``); ``,`` and ``=`` inside ``[...]`` are its options."""
    if len(split_outside_brackets(trace, "=")) == 1:
        if not trace.strip():
            raise ValueError("trace is empty")
        check_source(trace)
        return [(trace, None)]
    pairs: list[tuple[str, str | None]] = []
    for part in split_outside_brackets(trace, ","):
        name, sep, slo_class = _split_tenant(part)
        if not sep or not name or not slo_class:
            raise ValueError(
                f"tenant {part!r} of trace {trace!r} is not TRACE=CLASS "
                "(e.g. azure-conv=urgent,azure-code=relaxed)"
            )
        check_source(name)
        pairs.append((name, slo_class))
    return pairs


def _split_tenant(part: str) -> tuple[str, str, str]:
    """``TRACE=CLASS`` split at its last ``=`` outside brackets: (trace, "=", class)."""
    pieces = split_outside_brackets(part, "=")
    if len(pieces) < 2:
        return part.strip(), "", ""
    return "=".join(pieces[:-1]).strip(), "=", pieces[-1].strip()


def priority_by_target(ttft_slo_s: Mapping[str, float]) -> dict[str, int]:
    """SLO class -> priority ranked by TTFT target: the tightest class 0, the next 1, ...
    (classes with equal targets share a rank): what a request's urgency means to a server
    that only orders by an integer."""
    ranks = {target: rank for rank, target in enumerate(sorted(set(ttft_slo_s.values())))}
    return {name: ranks[target] for name, target in sorted(ttft_slo_s.items())}


def parse_priority_spec(spec: str, ttft_slo_s: Mapping[str, float]) -> dict[str, int]:
    """A ``--priority`` value: ``auto`` (``priority_by_target`` of ``ttft_slo_s``) or
    ``CLASS=N,CLASS=N`` (explicit integers). Raises ``ValueError`` naming the bad part."""
    if spec.strip() == "auto":
        return priority_by_target(ttft_slo_s)
    priorities: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        try:
            number = int(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise ValueError(
                f"priority {part!r} of {spec!r} is not CLASS=INTEGER (e.g. text=0,file=3), "
                "nor is the whole value 'auto'"
            )
        priorities[name] = number
    return priorities
