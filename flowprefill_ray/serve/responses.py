"""OpenAI response bodies: completions and chat completions, whole and as stream chunks.

``kind`` is ``"completion"`` (POST /v1/completions: ``text``) or ``"chat"`` (POST
/v1/chat/completions: ``message`` / ``delta``). Only n=1 is served, so there is one choice
with index 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class ResponseIdentity:
    """What every body and chunk of one response repeats: its id, creation time (Unix
    seconds) and model name."""

    response_id: str
    created: int
    model: str
    kind: Kind

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_body(
    ident: ResponseIdentity,
    text: str,
    finish_reason: str | None,
    usage: dict[str, int],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A non-streaming response. ``extra`` adds server-specific top-level fields (clients
    ignore unknown fields)."""
    if ident.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**ident._envelope(chunk=False), "choices": [choice], "usage": usage, **(extra or {})}


def chunk_body(
    ident: ResponseIdentity,
    text: str,
    finish_reason: str | None,
    *,
    first: bool = False,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed chunk carrying a text delta. With ``include_usage`` every chunk has
    ``"usage": null`` and a last ``usage_chunk`` carries the counts, as OpenAI does."""
    if ident.kind == "chat":
        delta: dict[str, Any] = {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {**ident._envelope(chunk=True), "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(ident: ResponseIdentity, usage: dict[str, int]) -> dict[str, Any]:
    """The final chunk of a stream with ``stream_options.include_usage``: no choices."""
    return {**ident._envelope(chunk=True), "choices": [], "usage": usage}
