"""Reading a JSON request body safely: size limit before parsing, strict UTF-8, JSON object.

The size limit is enforced while the body streams in (and up front from ``Content-Length``),
so a 10 MB body costs at most ``max_bytes`` of memory before it is refused with 413.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .errors import APIError


async def read_json_object(
    chunks: AsyncIterator[bytes], content_length: str | None, max_bytes: int
) -> dict[str, Any]:
    """Read, decode and parse a JSON object body.

    Raises ``APIError``: 413 over ``max_bytes`` (bytes), 400 for bytes that are not UTF-8,
    422 for malformed JSON or a JSON value that is not an object. ``NaN`` and ``Infinity``
    literals parse to floats so that range checks can answer them with a precise 400.
    """
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise APIError(400, f"Invalid Content-Length header: {content_length!r}") from None
        if declared > max_bytes:
            raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in chunks:
        body.extend(chunk)
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"Request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    if not text.strip():
        raise APIError(422, "Request body is empty; send a JSON object", code="json_invalid")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(
            422,
            f"Malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            code="json_invalid",
        ) from None
    if not isinstance(value, dict):
        raise APIError(
            422, f"Request body must be a JSON object, got {type(value).__name__}",
            code="json_type",
        )
    return value


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"Request body exceeds the limit of {max_bytes} bytes", code="body_too_large"
    )
