"""Errors the engine raises to its callers, typed so the HTTP layer can map each to a status.

Every error carries ``http_status`` so a front end needs no table of its own; the messages
name the problem (which bound, which request) because they are shown to API users. Plain
Python (no torch, no Ray) and outside the ``runtime`` package, whose ``__init__`` imports both:
the request validator (engine_request.py) and the Serve front end raise and map them too.
"""

from __future__ import annotations


class RuntimeEngineError(Exception):
    """Base class of every error :class:`FlowPrefillEngine` raises on purpose."""

    http_status = 500


class InvalidRequestError(RuntimeEngineError, ValueError):
    """The request itself is malformed (empty prompt, bad SLO class, bad sampling).

    ``param``/``code``: the offending request field and an OpenAI-style error code, which the
    HTTP front end puts in its error body (None: ``code`` "invalid_request", no field)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self):
        # Ray pickles errors across actors; rebuild from the constructor's own arguments.
        return (type(self), (str(self), self.param, self.code))


class PromptTooLongError(InvalidRequestError):
    """The prompt has more tokens than the engine accepts (``max_prompt_tokens``, which stays
    within the model's context, so a prompt never reaches the model's own
    ``SequenceTooLongError``). HTTP 413 (``context_length_exceeded``)."""

    http_status = 413

    def __init__(self, prompt_tokens: int, max_prompt_tokens: int):
        super().__init__(
            f"prompt has {prompt_tokens} tokens, more than the limit of {max_prompt_tokens} "
            "tokens (the model's context, less at least one token for output, or the "
            "server's requests.max_prompt_tokens)",
            param="prompt",
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.max_prompt_tokens = max_prompt_tokens

    def __reduce__(self):
        # Ray pickles errors across actors; rebuild from the constructor's own arguments.
        return (type(self), (self.prompt_tokens, self.max_prompt_tokens))


class RequestRejectedError(RuntimeEngineError):
    """Admission control refused the request (HTTP 429 with ``Retry-After``)."""

    http_status = 429

    def __init__(self, request_id: str, reason: str, retry_after_s: float):
        super().__init__(
            f"request {request_id} rejected: {reason} (retry after {retry_after_s:.1f} s)"
        )
        self.request_id = request_id
        self.reason = reason
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        # Ray pickles errors across actors; rebuild from the constructor's own arguments.
        return (type(self), (self.request_id, self.reason, self.retry_after_s))


class DuplicateRequestError(InvalidRequestError):
    """A request with this id is already in flight."""

    def __init__(self, request_id: str):
        super().__init__(f"request id {request_id!r} is already in flight")
        self.request_id = request_id

    def __reduce__(self):
        return (type(self), (self.request_id,))


class EngineUnavailableError(RuntimeEngineError):
    """The engine is not started, shutting down, or lost the workers a request needed."""

    http_status = 503


class RequestFailedError(RuntimeEngineError):
    """A request could not finish because a worker failed while serving it."""

    http_status = 500


class RequestTimeoutError(RequestFailedError):
    """A request did not finish within ``RequestBounds.request_timeout_s``; what it held was
    released. Bounds a request even when a worker hangs while staying alive."""

    http_status = 504
