"""Sending one streaming request to an OpenAI-compatible endpoint and timing it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import httpx

from .config import EndpointConfig, ReplayConfig
from .plan import PlannedRequest
from .prompts import block_prompt_text, block_prompt_token_ids, prompt_text, prompt_token_ids
from .result import RequestResult

# Keys under which a server may attach per-request scheduling facts to a stream chunk (our
# server's extension; vLLM and SGLang send none). Values are merged into ``record.server``.
SERVER_EXTENSION_KEYS = ("flowprefill", "timings")


def request_prompt_ids(replay: ReplayConfig, planned: PlannedRequest) -> list[int]:
    """The token ids ``planned`` sends: built from its hash-id blocks when it has them (shared
    blocks are shared tokens), else drawn for this request alone."""
    low, high = replay.token_id_low, replay.token_id_high
    if planned.hash_ids and planned.block_tokens:
        return block_prompt_token_ids(
            planned.prompt_tokens,
            planned.hash_ids,
            planned.block_tokens,
            replay.seed,
            planned.request_id,
            low,
            high,
        )
    return prompt_token_ids(planned.prompt_tokens, replay.seed, planned.request_id, low, high)


def request_prompt_text(replay: ReplayConfig, planned: PlannedRequest) -> str:
    """The chat text ``planned`` sends (see ``request_prompt_ids``)."""
    if planned.hash_ids and planned.block_tokens:
        return block_prompt_text(
            planned.prompt_tokens,
            planned.hash_ids,
            planned.block_tokens,
            replay.seed,
            planned.request_id,
        )
    return prompt_text(planned.prompt_tokens, replay.seed, planned.request_id)


def request_body(
    endpoint: EndpointConfig, replay: ReplayConfig, planned: PlannedRequest
) -> dict[str, Any]:
    """The JSON body for ``planned``: streaming, usage in the last chunk, SLO class attached."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": planned.max_output_tokens,
        "temperature": endpoint.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.api == "completions":
        body["prompt"] = request_prompt_ids(replay, planned)
    else:
        body["messages"] = [{"role": "user", "content": request_prompt_text(replay, planned)}]
    if endpoint.send_slo:
        body["slo_class"] = planned.slo_class
    if endpoint.ignore_eos:
        body["ignore_eos"] = True
    if endpoint.priority is not None:
        body["priority"] = endpoint.priority[planned.slo_class]
    return body


def request_headers(endpoint: EndpointConfig, planned: PlannedRequest) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    if endpoint.send_slo:
        headers["X-SLO-Class"] = planned.slo_class
    return headers


# The SSE grammar ends a line at CRLF, LF or CR, and nowhere else.
_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


class SSELineSplitter:
    """Splits the decoded text chunks of an SSE stream into lines at CRLF, LF or CR only.

    Not httpx's ``iter_lines``/``aiter_lines``: they split like ``str.splitlines``, also at
    U+2028, U+2029, NEL and other separators, which JSON may carry unescaped inside a string.
    vLLM and our server both stream text that way (``ensure_ascii=False``), so a token that
    decoded to one cut a valid data line in two and the request was recorded as an error:
    up to two requests per vLLM trial in every peer run before this fix (none of ours there).
    """

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, chunk: str) -> list[str]:
        """The lines ``chunk`` completes."""
        text = self._pending + chunk
        # A CR at the end of a chunk may be the first half of a CRLF: decide with the next.
        held_cr = text.endswith("\r")
        if held_cr:
            text = text[:-1]
        *lines, self._pending = _SSE_LINE_END.split(text)
        if held_cr:
            self._pending += "\r"
        return lines

    def close(self) -> list[str]:
        """The last line, if the stream ended without a line end."""
        pending, self._pending = self._pending, ""
        return [line for line in _SSE_LINE_END.split(pending) if line] if pending else []


def sse_lines_of(chunks: Iterable[str]) -> Iterator[str]:
    """``SSELineSplitter`` over a synchronous stream (``httpx.Response.iter_text()``)."""
    splitter = SSELineSplitter()
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.close()


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """``SSELineSplitter`` over an asynchronous stream (``aiter_text()``)."""
    splitter = SSELineSplitter()
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.close():
        yield line


async def sse_payloads(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON payload of each ``data:`` event of an SSE stream, until ``data: [DONE]``.

    Comments (``:``), ``event:``/``id:`` lines and blank separators are skipped. A ``data``
    line that is not JSON raises ``ValueError`` naming it: a broken stream must not be timed as
    a good one.
    """
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"stream sent a data line that is not JSON: {data[:200]!r}") from exc
        if isinstance(payload, dict):
            yield payload


def _carries_token(payload: dict[str, Any]) -> bool:
    choices = payload.get("choices")
    return bool(choices)


def _record_chunk(record: RequestResult, payload: dict[str, Any], now_s: float) -> None:
    if "error" in payload:
        err = payload["error"]
        message = err.get("message") if isinstance(err, dict) else err
        raise RuntimeError(f"server error in stream: {message}")
    if _carries_token(payload):
        if record.first_token_s is None:
            record.first_token_s = now_s
        record.token_times_s.append(now_s)
    usage = payload.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        record.output_tokens = usage["completion_tokens"]
    for key in SERVER_EXTENSION_KEYS:
        extension = payload.get(key)
        if isinstance(extension, dict):
            record.server.update(extension)


async def send_streaming(
    client: httpx.AsyncClient,
    endpoint: EndpointConfig,
    replay: ReplayConfig,
    planned: PlannedRequest,
    clock: Callable[[], float],
    record: RequestResult,
) -> RequestResult:
    """Send ``planned`` and fill ``record`` as the stream arrives; returns ``record``.

    ``clock()`` gives seconds since the run started. Failures never raise: they are recorded
    (``http_error`` with the status and the server's message, or ``error``), so one bad request
    cannot stop a run. Cancellation (the run's drain deadline) leaves the record ``unfinished``.
    """
    body = request_body(endpoint, replay, planned)
    headers = request_headers(endpoint, planned)
    record.status = "unfinished"
    record.sent_s = clock()
    record.sent_wall_s = time.time()
    try:
        # httpx's timeouts bound each read; this bounds the whole request.
        await asyncio.wait_for(
            _stream_into(client, endpoint, body, headers, clock, record),
            endpoint.request_timeout_s,
        )
    except asyncio.TimeoutError:
        record.status = "error"
        record.error = f"timed out after {endpoint.request_timeout_s:g} s"
        record.end_s = clock()
    return record


async def _stream_into(
    client: httpx.AsyncClient,
    endpoint: EndpointConfig,
    body: dict[str, Any],
    headers: dict[str, str],
    clock: Callable[[], float],
    record: RequestResult,
) -> None:
    try:
        async with client.stream("POST", endpoint.path, json=body, headers=headers) as response:
            record.http_status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                record.status = "http_error"
                record.error = _error_message(text)
                record.end_s = clock()
                return
            async for payload in sse_payloads(sse_lines(response.aiter_text())):
                _record_chunk(record, payload, clock())
        record.end_s = clock()
        if record.output_tokens == 0:
            # No usage chunk: every token chunk stands for one token.
            record.output_tokens = len(record.token_times_s)
        record.status = "ok"
    except (httpx.HTTPError, ValueError, RuntimeError) as exc:
        record.status = "error"
        record.error = f"{type(exc).__name__}: {exc}"
        record.end_s = clock()


def _error_message(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", data["error"]))[:500]
    return text[:500]


def new_client(endpoint: EndpointConfig, max_connections: int = 1024) -> httpx.AsyncClient:
    """One shared HTTP client for a run. The pool is large because an open-loop run may have
    hundreds of requests in flight; per-request time limits come from the endpoint config."""
    return httpx.AsyncClient(
        base_url=endpoint.base_url,
        timeout=httpx.Timeout(endpoint.request_timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
    )


def monotonic_clock(start: float) -> Callable[[], float]:
    """Seconds since ``start`` on ``time.perf_counter``."""
    return lambda: time.perf_counter() - start
