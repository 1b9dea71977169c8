"""One request as the engine serves it, validated once, where it enters the system.

``RequestLimits`` gathers every bound a request is checked against: the model's vocabulary and
context (``ModelConfig``), the server's bounds (``RuntimeConfig.requests``), a decode worker's
KV capacity and the SLO classes. ``RequestLimits.build`` is the one validator: the HTTP front
end (serve/frontend.py) and the Python API (``FlowPrefillEngine.submit``) both call it, and
what it returns, an ``EngineRequest``, travels inward unchanged: engine -> scheduler (which
keeps it in its ``TrackedRequest``) -> the prefill workers' ``PrefillItemSpec`` and the decode
worker's ``Handoff``, both derived from it. Nothing further in checks the same bounds again.

Errors are the engine's typed errors (errors.py), each naming the offending field and an
OpenAI-style code, so the front end maps them to its 400/413 bodies without a table of its own.

Plain Python: no torch, no Ray (the front end and the simulator-side tools can import it).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowprefill_ray.errors import InvalidRequestError, PromptTooLongError
from flowprefill_ray.sampling_params import MAX_CACHE_SALT_CHARS, SamplingParams

if TYPE_CHECKING:
    from flowprefill_ray.scheduling.slo import SLOConfig


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A validated request. ``slo_class`` is the class it asked for (or the default class);
    ``ttft_slo_s`` the TTFT target in force, seconds: the explicit one when given, else the
    class's. ``timeout_s`` bounds the whole request (None: no bound). ``client_id``: the lease
    of the ingress client that submitted it (serve/client_leases.py), stamped by that client's
    engine; None for an engine that owns its actors (nothing else can die under it)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    slo_class: str
    ttft_slo_s: float
    timeout_s: float | None
    cache_salt: str | None = None
    client_id: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Every bound a request is checked against (tokens, seconds); see the module docstring.

    ``context_tokens``: prompt + output tokens the model holds; ``max_prompt_tokens``: the
    longest prompt accepted (within the context, one token left for output);
    ``decode_capacity_tokens``: what the smallest decode worker's KV pool holds;
    ``request_timeout_s``: the default bound on a whole request (None: unbounded)."""

    vocab_size: int
    context_tokens: int
    max_prompt_tokens: int
    max_output_tokens: int
    decode_capacity_tokens: int
    slo: SLOConfig
    request_timeout_s: float | None = None

    @classmethod
    def of(cls, model_config, runtime_config, decode_capacity_tokens: int) -> RequestLimits:
        """From a ``ModelConfig`` and a ``RuntimeConfig`` (not imported: both packages load
        torch or Ray) and the decode workers' measured capacity."""
        context = model_config.context_limit
        bounds = runtime_config.requests
        return cls(
            vocab_size=model_config.vocab_size,
            context_tokens=context,
            max_prompt_tokens=max_prompt_tokens(bounds.max_prompt_tokens, context),
            max_output_tokens=bounds.max_output_tokens,
            decode_capacity_tokens=decode_capacity_tokens,
            slo=runtime_config.slo,
            request_timeout_s=bounds.request_timeout_s,
        )

    def default_max_tokens(self, prompt_tokens: int, preferred: int) -> int:
        """``max_tokens`` for a request that names none: ``preferred``, within what is left of
        the context and the server's output bound (at least 1; ``build`` judges the prompt)."""
        room = self.context_tokens - prompt_tokens
        return max(1, min(preferred, room, self.max_output_tokens))

    def build(
        self,
        prompt_ids,
        sampling: SamplingParams,
        *,
        slo_class: str | None = None,
        ttft_slo_s: float | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        cache_salt: str | None = None,
    ) -> EngineRequest:
        """Check a request against every bound and return it as an ``EngineRequest``.

        ``slo_class``: None for the default class; ``ttft_slo_s``: an explicit TTFT target
        (seconds) that overrides the class's, which stays the label. Raises
        ``InvalidRequestError`` (``PromptTooLongError`` for a prompt over the limit)."""
        ids = tuple(int(t) for t in prompt_ids)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
                code="invalid_token_id",
            )
        slo_class, target = self._slo(slo_class, ttft_slo_s)
        if not ids:
            raise InvalidRequestError(
                "the prompt is empty (no tokens after tokenization)", param="prompt"
            )
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.max_prompt_tokens)
        self._check_output(len(ids), sampling.max_tokens)
        if cache_salt is not None and not (
            isinstance(cache_salt, str) and 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS
        ):
            raise InvalidRequestError(
                f"cache_salt must be a string of 1 to {MAX_CACHE_SALT_CHARS} characters",
                param="cache_salt",
            )
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidRequestError(
                f"timeout_s must be positive seconds, got {timeout_s!r}", param="timeout_s"
            )
        return EngineRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            sampling=sampling,
            slo_class=slo_class,
            ttft_slo_s=target,
            timeout_s=timeout_s if timeout_s is not None else self.request_timeout_s,
            cache_salt=cache_salt,
        )

    def _slo(self, slo_class: str | None, ttft_slo_s: float | None) -> tuple[str, float]:
        names = self.slo.class_names
        if slo_class is not None and slo_class not in names:
            raise InvalidRequestError(
                f"unknown SLO class {slo_class!r}; known classes: {', '.join(sorted(names))}",
                param="slo_class",
                code="unknown_slo_class",
            )
        slo_class = slo_class or self.slo.default_class
        if ttft_slo_s is None:
            return slo_class, self.slo.resolve(slo_class).ttft_slo_s
        if (
            isinstance(ttft_slo_s, bool)
            or not isinstance(ttft_slo_s, (int, float))
            or not math.isfinite(ttft_slo_s)
            or not ttft_slo_s > 0
        ):
            raise InvalidRequestError(
                f"the TTFT target must be a positive number of seconds, got {ttft_slo_s!r}",
                param="ttft_slo_ms",
                code="invalid_ttft_slo",
            )
        return slo_class, float(ttft_slo_s)

    def _check_output(self, prompt_tokens: int, max_tokens: int) -> None:
        room = self.context_tokens - prompt_tokens
        if max_tokens > room or max_tokens > self.max_output_tokens:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} is too large: the prompt has {prompt_tokens} tokens "
                f"of a {self.context_tokens}-token context (room for {room}) and this server "
                f"allows at most {self.max_output_tokens} output tokens",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        if prompt_tokens + max_tokens > self.decode_capacity_tokens:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed a decode "
                f"worker's KV capacity of {self.decode_capacity_tokens} tokens",
                param="max_tokens",
            )


def max_prompt_tokens(configured: int | None, context_tokens: int) -> int:
    """The longest prompt the engine accepts: the configured bound (None: none), within the
    context (one position is left for the first generated token)."""
    return min(configured or context_tokens - 1, context_tokens - 1)
