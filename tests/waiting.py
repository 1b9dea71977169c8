"""The one way a test waits for a condition: poll it until it holds, or fail naming it.

``wait_until`` (threads, sync code) and ``async_wait_until`` (inside an event loop) return the
predicate's first truthy value; past ``timeout_s`` they raise an AssertionError that says what
was awaited. Tests wait through these (or an event the other side sets), never by sleeping.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.02


def _timed_out(timeout_s: float, what: str | Callable[[], str], last_error) -> AssertionError:
    described = what() if callable(what) else what
    message = f"timed out after {timeout_s:g} s waiting for {described}"
    if last_error is not None:
        message += f" (last error: {type(last_error).__name__}: {last_error})"
    return AssertionError(message)


def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    poll_s: float = POLL_S,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Call ``predicate()`` every ``poll_s`` seconds until it returns something truthy (which
    is returned). Exceptions of the ``ignore`` types count as "not yet". ``what`` (a string,
    or a callable giving one at the time of failure) names the awaited condition."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while True:
        try:
            value = predicate()
        except ignore as error:
            last_error, value = error, None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what, last_error)
        time.sleep(poll_s)


async def async_wait_until(
    predicate: Callable[[], Any],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    poll_s: float = POLL_S,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """``wait_until`` inside an event loop: ``predicate`` may be a plain or an async callable;
    the loop keeps running between polls."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore as error:
            last_error, value = error, None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what, last_error)
        await asyncio.sleep(poll_s)
