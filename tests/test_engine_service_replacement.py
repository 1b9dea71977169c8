"""The engine service dies and Serve replaces it: a fresh engine (scheduler, workers) comes up,
the ingress replica finds its scheduler gone, fails its health check, and its replacement
attaches to the new engine. Over real HTTP: a local Ray cluster, Serve on a free loopback port,
the tiny model on CPU (engine_service.py, app.py).
"""

from __future__ import annotations

import httpx
import pytest
from conftest_ray import free_port, tiny_runtime_args
from waiting import wait_until

from flowprefill_ray.serve.app import REPLICA_HEADER

pytestmark = pytest.mark.ray

APP_NAME = "flowprefill-replace-test"
MODEL = "flowprefill-tiny"


def app_args(cache_dir: str) -> dict:
    runtime = tiny_runtime_args(cache_dir, "fp-replace-test", slo={"scale": 50.0})
    return {"runtime": runtime, "api": {"default_max_tokens": 4}}


def _service_replica_name() -> str:
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#EngineService#"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]
    assert len(names) == 1, names
    return names[0]


def _scheduler_pid(service) -> int:
    import ray

    attachment = service.attachment.remote().result()
    return ray.get(attachment.scheduler.stats.remote(), timeout=30)["pid"]


def test_a_replaced_engine_service_serves_again_through_a_reattached_ingress(
    ray_local, runtime_cache_dir
):
    import ray
    from ray import serve

    from flowprefill_ray.serve.app import compose_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose_app(app_args(runtime_cache_dir)), name=APP_NAME, route_prefix="/")
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 4}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as http:
            before = http.post("/v1/completions", json=body)
            assert before.status_code == 200, before.text
            service = serve.get_deployment_handle("EngineService", APP_NAME)
            pid_before = _scheduler_pid(service)
            old_service = _service_replica_name()

            ray.kill(ray.get_actor(old_service, namespace="serve"))

            def served():
                try:
                    response = http.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    return None
                return response if response.status_code == 200 else None

            # Serve restarts the service (a new engine: model load, profile), then the ingress
            # replica fails its health checks and is replaced: minutes on a busy 2-core box.
            after = wait_until(served, 300.0, "a request served after the service died", poll_s=1.0)
        assert _service_replica_name() != old_service
        assert _scheduler_pid(service) != pid_before  # a new engine, not the old scheduler
        assert after.headers[REPLICA_HEADER] != before.headers[REPLICA_HEADER]
        assert after.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
