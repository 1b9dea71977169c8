"""HTTP errors in OpenAI's JSON error format.

Every error the API returns has the body
``{"error": {"message", "type", "param", "code", "request_id"}}`` so that OpenAI clients
surface the message instead of a parse failure. ``APIError`` carries the status code and
optional headers (``Retry-After`` for 429 and 503, ``WWW-Authenticate`` for 401); the FastAPI
app renders it with ``error_response``. ``request_id`` is Serve's request id: also the
``X-Request-Id`` response header, and in the server log beside the details.

A 4xx message tells the client what to fix. A 5xx message is generic (``server_error``):
the cause (a traceback, a worker's pid, a source path) goes to the server log only, under the
request id the client can quote.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

# OpenAI's error ``type`` values, by status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    408: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}

# What a 5xx says instead of its cause.
_GENERIC_5XX = {
    500: "The server could not complete this request",
    503: "The service is temporarily unavailable; retry later",
    504: "The request did not complete in time",
}

# Pydantic error types that mean "the JSON has the wrong shape" (HTTP 422). Every other
# validation failure is a value outside its allowed range (HTTP 400).
_SHAPE_ERROR_TYPES = {
    "missing",
    "extra_forbidden",
    "model_type",
    "model_attributes_type",
    "dict_type",
    "list_type",
    "string_type",
    "int_type",
    "float_type",
    "bool_type",
    "int_from_float",
    "union_tag_invalid",
    "union_tag_not_found",
    "literal_error",
    "json_invalid",
    "json_type",
    "is_instance_of",
}


class APIError(Exception):
    """An error answered to the HTTP client.

    ``retry_after_s`` (seconds) becomes a ``Retry-After`` header, rounded up to whole seconds
    as HTTP requires.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status_code, "invalid_request_error")
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
                "request_id": request_id,
            }
        }


def error_response(error: APIError, request_id: str | None = None) -> JSONResponse:
    # No X-Request-Id header here: Serve's proxy adds it, with this same id.
    return JSONResponse(
        error.body(request_id), status_code=error.status_code, headers=error.headers
    )


def server_error(
    status_code: int = 500, *, code: str = "server_error", retry_after_s: float | None = None
) -> APIError:
    """A 5xx whose message says nothing of its cause (the caller logs that)."""
    message = _GENERIC_5XX.get(status_code, _GENERIC_5XX[500])
    return APIError(status_code, message, code=code, retry_after_s=retry_after_s)


def from_validation_error(exc: ValidationError) -> APIError:
    """Map a pydantic failure on a request body: wrong shape -> 422, bad value -> 400.

    The message names the offending field (dotted path) so a user can fix the request.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
    )
    shape_error = all(e["type"] in _SHAPE_ERROR_TYPES for e in errors)
    status = 422 if shape_error else 400
    return APIError(status, f"Invalid request: {detail}", param=param, code=first["type"])
