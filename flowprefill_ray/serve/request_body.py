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
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(value, dict):
        raise APIError(
            422,
            f"Request body must be a JSON object, got {type(value).__name__}",
            code="json_type",
        )
    _check_values(value)
    return value


# No request field nests deeper than a few levels (chat content parts are 4); anything far
# deeper is refused before validation or a tokenizer has to walk it.
MAX_JSON_DEPTH = 32


def _check_values(value: Any) -> None:
    """Refuse nesting beyond ``MAX_JSON_DEPTH`` and strings that are not Unicode text: JSON's
    ``\ud800`` escapes decode to lone surrogates, which no tokenizer can encode. Iterative, so
    a deep body cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(
                    400,
                    f"Request body has a string with an unpaired surrogate "
                    f"(\\u{ord(item[exc.start]):04x}); send valid Unicode text",
                    code="invalid_encoding",
                ) from None


def _too_deep() -> APIError:
    return APIError(
        400, f"Request body nests deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
    )


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"Request body exceeds the limit of {max_bytes} bytes", code="body_too_large"
    )
