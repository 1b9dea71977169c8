"""A test ASGI app served over real HTTP on 127.0.0.1, in a thread of the test process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from conftest_ray import free_port
from waiting import wait_until


@contextmanager
def serving(app, what: str) -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1; yields its base URL, stops it on exit."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, f"{what} to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
