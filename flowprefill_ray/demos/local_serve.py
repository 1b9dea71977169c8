"""Our Serve app on a local Ray cluster, for the demo and the live benchmarks.

``LocalServe`` starts Ray on this machine (loopback only), starts Serve's HTTP proxy on
127.0.0.1 at a chosen port, and deploys ``flowprefill_ray.serve.app:build_app`` with the given
args. ``redeploy`` swaps the app for one with other args (another policy) on the same cluster,
so each policy starts from a fresh engine: its scheduler, queues and TTFT predictor are new.
Leaving the context (normally, on an error or on Ctrl-C) deletes the app, shuts Serve down and
stops Ray.

It lives with the demos, not in ``loadgen``: the load generator only talks HTTP to an
endpoint (ours, vLLM, SGLang) and imports nothing of the runtime or the Serve app.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import httpx

from flowprefill_ray.process_env import apply_defaults

APP_NAME = "flowprefill"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServe:
    """Context manager: a local Ray cluster with our Serve app at ``http://127.0.0.1:{port}``.

    ``num_cpus``: logical CPUs Ray may hand out (actors declare how many they take; on a small
    machine give more than the cores so every worker fits). ``ready_timeout_s``: seconds to wait
    for ``/health`` after a deploy (model loading and predictor profiling happen there).
    """

    def __init__(
        self,
        app_args: dict[str, Any],
        port: int | None = None,
        num_cpus: int | None = None,
        ready_timeout_s: float = 300.0,
    ) -> None:
        self.app_args = app_args
        self.port = port or free_port()
        self.num_cpus = num_cpus
        self.ready_timeout_s = ready_timeout_s
        self._started_ray = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServe:
        # Ray binds every listener to 127.0.0.1, Serve's front end runs at the workers'
        # priority (flowprefill_ray.process_env).
        apply_defaults()
        import ray
        from ray import serve

        try:
            if not ray.is_initialized():
                # address="local": always a new cluster of our own, never someone else's.
                # Logical CPUs: enough for every actor the app declares, even on a 2-core
                # machine (Ray would otherwise leave a worker pending forever).
                num_cpus = self.num_cpus or max(
                    os.cpu_count() or 1, logical_cpus_needed(self.app_args)
                )
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                )
                self._started_ray = True
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
            self._deploy(self.app_args)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def redeploy(self, app_args: dict[str, Any]) -> None:
        """Replace the app with one built from ``app_args`` (its engine starts from scratch)."""
        from ray import serve

        serve.delete(APP_NAME)
        self.app_args = app_args
        self._deploy(app_args)

    def _deploy(self, app_args: dict[str, Any]) -> None:
        from ray import serve

        from flowprefill_ray.serve.app import build_app

        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from ray import serve

        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            app = serve.status().applications.get(APP_NAME)
            if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
                raise RuntimeError(f"the Serve app failed to deploy: {app.message}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=5.0)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise TimeoutError(
            f"the Serve app at {self.url} was not healthy after {self.ready_timeout_s:g} s ({last})"
        )

    def __exit__(self, *exc_info: object) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                try:
                    serve.delete(APP_NAME)
                finally:
                    serve.shutdown()
        finally:
            if self._started_ray and ray.is_initialized():
                ray.shutdown()


def logical_cpus_needed(app_args: dict[str, Any]) -> int:
    """Ray CPUs the app's actors declare (workers, scheduler, ingress), rounded up, plus one
    for Serve's controller and proxy."""
    import math

    from flowprefill_ray.serve.config import ServeAppArgs

    placement = ServeAppArgs.model_validate(app_args).runtime.placement
    declared = (
        placement.num_prefill_workers * placement.prefill_num_cpus
        + placement.num_decode_workers * placement.decode_num_cpus
        + placement.scheduler_num_cpus
        + 0.1  # the ingress replica
    )
    return math.ceil(declared) + 1


def serve_app_args(
    model: str,
    policy: dict[str, Any],
    slo_scale: float,
    num_prefill_workers: int = 1,
    num_decode_workers: int = 1,
    profile_max_tokens: int | None = None,
) -> dict[str, Any]:
    """Args for ``build_app``: ``model`` is ``tiny``, ``default`` or a checkpoint directory;
    ``policy`` a ``PolicyConfig`` dict (``{"name": "fcfs"}``...); ``slo_scale`` multiplies the
    four classes' TTFT targets; ``profile_max_tokens`` the longest prompt the TTFT predictor
    times at start (the longest a replay sends: timing longer ones only slows the start-up; by
    default the runtime's own profile lengths). Validated here by the Serve app's own
    ``ServeAppArgs``, so a bad value fails before Ray starts."""
    from flowprefill_ray.runtime.config import PrefillConfig
    from flowprefill_ray.serve.config import ServeAppArgs

    runtime: dict[str, Any] = {
        "model": {"path": model},
        "placement": {
            "num_prefill_workers": num_prefill_workers,
            "num_decode_workers": num_decode_workers,
        },
        "policy": policy,
        "slo": {"scale": slo_scale},
    }
    if profile_max_tokens is not None:
        runtime["prefill"] = {"profile_tokens": PrefillConfig().profile_lengths(profile_max_tokens)}
    return ServeAppArgs.model_validate({"runtime": runtime}).model_dump(mode="json")


def served_model_name(app_args: dict[str, Any]) -> str:
    """The model name clients must send to an app built from ``app_args``."""
    from flowprefill_ray.serve.config import ServeAppArgs

    return ServeAppArgs.model_validate(app_args).served_model_name()
