"""Session-scoped Ray fixtures shared by the runtime tests (loaded from tests/conftest.py).

One local Ray cluster per test session (starting one costs seconds), and one runtime engine
per scheduling policy on it, built lazily the first time a test asks for that policy. Every
engine uses the generated tiny model on CPU.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Logical CPUs of the test cluster: actors ask for fractions, so this bounds how many fit, not
# how many cores they use (each worker runs torch on one thread).
RAY_TEST_CPUS = 8


def tiny_runtime_args(cache_dir: str, name_prefix: str, **overrides) -> dict:
    """The ``runtime`` section of a small test deployment: tiny model, one prefill and one
    decode worker on half a CPU each. An override section is merged into the default one of
    that name (a dict) or replaces it (anything else)."""
    args = {
        "model": {"path": "tiny", "cache_dir": cache_dir},
        "placement": {"prefill_num_cpus": 0.5, "decode_num_cpus": 0.5},
        "prefill": {"profile_tokens": [16, 64, 128, 256, 512], "profile_repeats": 1},
        "decode": {"kv_blocks": 256, "block_size": 16, "max_batch_size": 16},
        "name_prefix": name_prefix,
    }
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    return args


def runtime_test_config(cache_dir: str, policy: str, **overrides):
    """A small RuntimeConfig for tests (``tiny_runtime_args``) running ``policy``."""
    from flowprefill_ray.runtime.config import RuntimeConfig

    overrides["policy"] = {"name": policy, **overrides.get("policy", {})}
    name_prefix = overrides.pop("name_prefix", f"fp-test-{policy}")
    return RuntimeConfig.model_validate(tiny_runtime_args(cache_dir, name_prefix, **overrides))


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster (never attaches to another one), bound to 127.0.0.1."""
    import ray

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "set by tests/conftest.py"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=RAY_TEST_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def runtime_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("runtime-model-cache"))


@contextmanager
def started_engine(config) -> Iterator:
    """A ``FlowPrefillEngine`` started on ``config``, shut down when the block ends, also
    when it ends by an exception (a module fixture's ``with ... : yield``)."""
    from flowprefill_ray.runtime.engine import FlowPrefillEngine

    engine = asyncio.run(FlowPrefillEngine.start(config))
    try:
        yield engine
    finally:
        asyncio.run(engine.shutdown())


@pytest.fixture(scope="session")
def runtime_engines(ray_local, runtime_cache_dir):
    """``get(policy)`` -> a started FlowPrefillEngine for that policy (one per session)."""
    from flowprefill_ray.runtime.engine import FlowPrefillEngine

    engines: dict[str, FlowPrefillEngine] = {}

    def get(policy: str) -> FlowPrefillEngine:
        if policy not in engines:
            config = runtime_test_config(runtime_cache_dir, policy)
            engines[policy] = asyncio.run(FlowPrefillEngine.start(config))
        return engines[policy]

    yield get
    for engine in engines.values():
        asyncio.run(engine.shutdown())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """Pids whose environment carries ``marker`` (e.g. ``RAY_TMPDIR=/tmp/x``): what a command
    under test started, its Ray processes included (processes of this user only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found
