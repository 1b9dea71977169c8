"""OpenAI-compatible front end over a FlowPrefill engine, with no HTTP framework in it.

``OpenAIFrontend`` takes parsed JSON bodies and headers and returns a response body (dict) or
an async iterator of SSE lines; the Serve deployment in ``app.py`` only moves bytes. Order of
checks for a request: API key (401), JSON shape (422) and values (400), model name (404), the
SLO headers (400); then the engine's one validator (``RequestLimits.build``, engine_request.py:
token ids, SLO class, ``max_tokens`` against what is left of the context: 400, prompt length:
413), whose typed errors map to HTTP like the engine's others (400/413/429/503).

Streaming waits for the engine's first event before the response starts, so a request the
engine refuses still gets a real status code (429 with Retry-After, 503) rather than an error
inside a 200 stream. A client that goes away (the task is cancelled) cancels its request in
the engine, whatever stage it is in.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from flowprefill_ray.engine_request import EngineRequest
from flowprefill_ray.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    RequestRejectedError,
    RequestTimeoutError,
    RuntimeEngineError,
)
from flowprefill_ray.request_clock import RequestClock
from flowprefill_ray.sampling_params import SamplingParams

from .config import ServeAppArgs
from .errors import APIError, from_validation_error, server_error
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ResponseIdentity, chunk_body, full_body, usage_body, usage_chunk
from .slo_selection import resolve_slo
from .sse import DONE, sse_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready for the engine (``request``, validated by the engine's own
    ``RequestLimits``) and how to answer it over HTTP."""

    request: EngineRequest
    stream: bool
    include_usage: bool
    ident: ResponseIdentity

    @property
    def request_id(self) -> str:
        return self.request.request_id


class OpenAIFrontend:
    """Translates OpenAI requests into ``engine.submit`` calls and engine events back.

    ``engine`` is a started ``FlowPrefillEngine``; its tokenizer and model config give the
    chat template, the vocabulary and the context length (prompt + output tokens).
    """

    def __init__(self, args: ServeAppArgs, engine) -> None:
        self.args = args
        self.engine = engine
        self.tokenizer = engine.tokenizer
        # Every bound a request is checked against, the engine's own (engine_request.py).
        self.limits = engine.limits
        self.context_tokens = self.limits.context_tokens
        self.model_name = args.served_model_name()
        self.created = int(time.time())

    # ------------------------------------------------------------------ endpoints

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the one served model."""
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "flowprefill",
                    "max_model_len": self.context_tokens,
                }
            ],
        }

    async def completion(
        self,
        body: dict[str, Any],
        headers: Mapping[str, str],
        request_id: str | None = None,
        clock: RequestClock | None = None,
    ):
        """POST /v1/completions. Returns a body dict, or an async iterator of SSE lines.
        ``request_id``: the HTTP request's id (``X-Request-Id``); the response id is
        ``cmpl-<request_id>``."""
        clock = clock or RequestClock()
        request = _parse(CompletionRequest, body)
        self._check_model(request)
        prompt = request.prompt
        if isinstance(prompt, str):
            # Tokenizing a large body takes a while: keep the event loop serving others.
            prompt_ids = await asyncio.to_thread(lambda: list(self.tokenizer(prompt)["input_ids"]))
        else:
            prompt_ids = list(prompt)  # checked against the vocabulary with the other bounds
        return await self._serve(
            request, prompt_ids, headers, "completion", "cmpl", request_id, clock
        )

    async def chat_completion(
        self,
        body: dict[str, Any],
        headers: Mapping[str, str],
        request_id: str | None = None,
        clock: RequestClock | None = None,
    ):
        """POST /v1/chat/completions, prompt built with the tokenizer's chat template."""
        clock = clock or RequestClock()
        request = _parse(ChatCompletionRequest, body)
        self._check_model(request)
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"model {self.model_name!r} has no chat template; use /v1/completions",
                code="no_chat_template",
            )
        prompt_ids = await asyncio.to_thread(
            self.tokenizer.apply_chat_template,
            request.template_messages(),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return await self._serve(
            request, list(prompt_ids), headers, "chat", "chatcmpl", request_id, clock
        )

    def _check_model(self, request) -> None:
        if request.model != self.model_name:
            raise APIError(
                404,
                f"The model {request.model!r} does not exist; this server "
                f"serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # ------------------------------------------------------------------ shared path

    async def _serve(self, request, prompt_ids, headers, kind, id_prefix, request_id, clock):
        """``clock``: the request's ``RequestClock``, started when it arrived (its TTFT and
        hop stamps; request_clock.py)."""
        prepared = self._prepare(request, prompt_ids, headers, kind, id_prefix, request_id)
        try:
            events = await self.engine.submit_request(prepared.request, clock)
        except RuntimeEngineError as exc:
            raise engine_error(exc, prepared.request_id) from None
        first = await self._first_event(prepared, events)
        if prepared.stream:
            return self._stream(prepared, first, events, clock)
        return await self._collect(prepared, first, events, clock)

    def _prepare(
        self, request, prompt_ids, headers, kind, id_prefix, request_id=None
    ) -> PreparedRequest:
        """Build the engine request through the engine's one validator; its typed errors
        become the HTTP errors (``engine_error``: 400 naming the field, 413 for the prompt)."""
        slo = resolve_slo(request.slo_class, request.ttft_slo_ms, headers)
        max_tokens = request.requested_max_tokens
        if max_tokens is None:
            max_tokens = self.limits.default_max_tokens(
                len(prompt_ids), self.args.api.default_max_tokens
            )
        request_id = f"{id_prefix}-{request_id or uuid.uuid4().hex}"
        try:
            engine_request = self.limits.build(
                prompt_ids,
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    stop=request.stop_sequences,
                    seed=request.seed,
                    ignore_eos=request.ignore_eos,
                ),
                slo_class=slo.slo_class,
                ttft_slo_s=slo.ttft_slo_s,
                request_id=request_id,
                cache_salt=request.cache_salt,
            )
        except InvalidRequestError as exc:
            raise engine_error(exc, request_id) from None
        ident = ResponseIdentity(request_id, int(time.time()), self.model_name, kind)
        return PreparedRequest(engine_request, request.stream, request.include_usage, ident)

    async def _first_event(self, prepared: PreparedRequest, events: AsyncIterator):
        try:
            return await anext(events)
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the request without output") from None
        except BaseException as exc:
            await self._abandon(prepared.request_id, events)
            if isinstance(exc, RuntimeEngineError):
                raise engine_error(exc, prepared.request_id) from None
            raise

    async def _collect(self, prepared: PreparedRequest, first, events, clock) -> dict[str, Any]:
        texts, finish, tokens, last = [], None, 0, first
        try:
            event = first
            while True:
                texts.append(event.text)
                tokens += event.token_id is not None
                finish = event.finish_reason or finish
                last = event
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
        except BaseException as exc:
            await self._abandon(prepared.request_id, events)
            if isinstance(exc, RuntimeEngineError):
                raise engine_error(exc, prepared.request_id) from None
            raise
        usage = usage_body(prepared.request.prompt_tokens, tokens)
        clock.mark("first_chunk")  # the whole body is the first (and only) chunk
        return full_body(
            prepared.ident, "".join(texts), finish, usage, extra=_extension(prepared, last)
        )

    async def _stream(self, prepared: PreparedRequest, first, events, clock) -> AsyncIterator[str]:
        ident, tokens, finished = prepared.ident, 0, False
        try:
            event, is_first = first, True
            while True:
                tokens += event.token_id is not None
                if is_first:
                    clock.mark("first_chunk")
                chunk = chunk_body(
                    ident,
                    event.text,
                    event.finish_reason,
                    first=is_first,
                    include_usage=prepared.include_usage,
                )
                if event.finish_reason is not None:
                    chunk.update(_extension(prepared, event))
                yield sse_event(chunk)
                is_first = False
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
            finished = True
            if prepared.include_usage:
                yield sse_event(
                    usage_chunk(ident, usage_body(prepared.request.prompt_tokens, tokens))
                )
        except RuntimeEngineError as exc:
            # Headers are sent: report in the stream, as OpenAI-compatible servers do.
            finished = True
            yield sse_event(engine_error(exc, prepared.request_id).body(prepared.request_id))
        finally:
            if not finished:  # the client went away (or the server is stopping)
                await self._abandon(prepared.request_id, events)
        yield DONE

    async def _abandon(self, request_id: str, events) -> None:
        """Release everything the request holds in the engine; never raises (it runs while
        an exception or a cancellation is already propagating)."""
        try:
            await asyncio.shield(_maybe_await(self.engine.cancel(request_id)))
        except BaseException:  # noqa: BLE001 - cleanup must not mask the original error
            logger.warning("cancelling request %s in the engine failed", request_id, exc_info=True)
        close = getattr(events, "aclose", None)
        if close is not None:
            try:
                await close()
            except BaseException:  # noqa: BLE001
                pass


def engine_error(exc: RuntimeEngineError, request_id: str | None = None) -> APIError:
    """Map the engine's typed errors to HTTP: a prompt over the context is 413, a rejection
    429 with Retry-After, an unavailable engine 503, other invalid requests 400. A 5xx keeps
    its cause out of the answer (it can carry Ray's actor ids and tracebacks): the cause is
    logged here under ``request_id``."""
    if isinstance(exc, RequestRejectedError):
        return APIError(429, str(exc), code="request_rejected", retry_after_s=exc.retry_after_s)
    if isinstance(exc, InvalidRequestError):
        # 400, or 413 for a prompt over the limit; the field and code come with the error.
        return APIError(
            exc.http_status, str(exc), param=exc.param, code=exc.code or "invalid_request"
        )
    status = getattr(exc, "http_status", 500)
    logger.warning("request %s failed with %d: %s", request_id, status, exc)
    if isinstance(exc, EngineUnavailableError):
        return server_error(503, code="engine_unavailable", retry_after_s=5.0)
    if isinstance(exc, RequestTimeoutError):
        return server_error(504, code="request_timeout")
    return server_error(status if status >= 500 else 500)


def _parse(model, body: dict[str, Any]):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _extension(prepared: PreparedRequest, event) -> dict[str, Any]:
    """Server-side timings (seconds) under the ``flowprefill`` key; the load generator reads
    it. ``ttft_s`` is measured in the ingress from the HTTP request's arrival to the first
    token; ``slo_met`` is the verdict on that same number (request_clock.py)."""
    info: dict[str, Any] = {
        "request_id": prepared.request_id,
        "slo_class": event.slo_class,
        "ttft_s": event.ttft_s,
        "ttft_slo_s": event.ttft_slo_s,
        # Judged once, with ttft_s, by the engine: the SLO counters record the same verdict.
        "slo_met": event.slo_met,
        "queue_s": event.queue_s,
        "preemptions": event.preemptions,
        # Wall-clock stamps of its first-token path (request_clock.HOPS; seconds, one host).
        "hops": dict(event.hops or {}),
    }
    if event.tpot_s is not None:
        info["tpot_s"] = event.tpot_s
    if event.downgraded_from is not None:
        # Admission control served it under a looser class than the one asked for.
        info["downgraded_from"] = event.downgraded_from
    return {"flowprefill": info}


async def _maybe_await(value):
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value
