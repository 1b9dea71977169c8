"""A wall-clock bound on one request, from submit to its last token.

Ray fails the calls of a dead worker at once, but a worker that is alive and stuck (a deadlock,
a hung GPU kernel) would hold its requests for ever. Every wait of a request goes through its
``RequestDeadline``; past it the request fails with :class:`RequestTimeoutError` and the
engine's usual clean-up (cancel at the scheduler or decode worker) releases what it held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from flowprefill_ray.errors import RequestTimeoutError

T = TypeVar("T")


class RequestDeadline:
    def __init__(self, request_id: str, timeout_s: float | None, started: float):
        """``timeout_s`` seconds after ``started`` (time.monotonic); None means no bound."""
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.at = None if timeout_s is None else started + timeout_s

    def remaining_s(self) -> float | None:
        return None if self.at is None else max(self.at - time.monotonic(), 0.0)

    def _expired(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"request {self.request_id} did not finish within {self.timeout_s:g} s "
            "(runtime.requests.request_timeout_s)"
        )

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` within the bound."""
        try:
            return await asyncio.wait_for(awaitable, self.remaining_s())
        except asyncio.TimeoutError:
            raise self._expired() from None

    async def iterate(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Yield from ``items``, each next item within what is left of the bound."""
        iterator = items.__aiter__()
        try:
            while True:
                try:
                    item = await self.wait(iterator.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await iterator.aclose()
