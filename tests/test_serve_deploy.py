"""`serve deploy` of our config to a running `ray start --head` cluster, through the CLI, with
Ray token authentication on and the HTTP API behind a Bearer key.

The cluster runs in its own process group on loopback ports picked free here (never Ray's
defaults, which other clusters on the machine may hold); teardown is `serve shutdown` and then
SIGTERM to that process group only (no `ray stop`, which would stop every cluster of the user).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest_ray import free_port, processes_with
from waiting import wait_until

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "flowprefill-tiny"


# Connection errors while a server comes up mean "not yet".
NOT_UP_YET = (httpx.HTTPError, OSError)


def deploy_config(http_port: int, cache_dir: str) -> dict:
    """deployments/local.yaml as shipped, with the tiny model instead of SmolLM2 (CI time), a
    free HTTP port, and the API key required."""
    config = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    config["http_options"]["port"] = http_port
    args = config["applications"][0]["args"]
    args["runtime"]["model"] = {"path": "tiny", "cache_dir": cache_dir}
    args["runtime"]["prefill"] = {"profile_tokens": [16, 64, 128, 256], "profile_repeats": 1}
    args["runtime"]["name_prefix"] = "fp-deploy-test"
    args["api"]["api_key_env"] = "FLOWPREFILL_API_KEY"
    return config


@pytest.fixture(scope="module")
def head_cluster(tmp_path_factory):
    """A `ray start --head --block` cluster with token auth; yields (env, dashboard address,
    API key, tmp dir)."""
    tmp = tmp_path_factory.mktemp("serve-deploy")
    ray_token, api_key = secrets.token_hex(16), secrets.token_hex(16)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every listener on 127.0.0.1
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": ray_token,
        # Replicas inherit the node's environment: this is how the key reaches the ingress
        # (on Kubernetes the same variable comes from a Secret).
        "FLOWPREFILL_API_KEY": api_key,
        "HF_HUB_OFFLINE": "1",
    }
    # Not inherited from tests/conftest.py: the config's own runtime_env must set the replicas'
    # niceness on a cluster started without it.
    env.pop("RAY_worker_niceness", None)
    dashboard = free_port()
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    log = open(tmp / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(
            lambda: (
                head.poll() is None
                and socket.create_connection(("127.0.0.1", dashboard), timeout=1).close() is None
            ),
            90,
            "the Ray dashboard",
            poll_s=0.5,
            ignore=NOT_UP_YET,
        )
        yield env, address, api_key, tmp
    finally:
        subprocess.run(
            [str(BIN / "serve"), "shutdown", "-y", "--address", address],
            env=env,
            capture_output=True,
            timeout=60,
        )
        stop_head_cluster(head)
        log.close()


def stop_head_cluster(head: subprocess.Popen) -> None:
    """Stop what `ray start --block` started: SIGINT makes it kill its Ray processes on exit;
    anything left in its process group is then killed."""
    head.send_signal(signal.SIGINT)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
    try:
        os.killpg(head.pid, signal.SIGKILL)  # stragglers of this cluster only
    except ProcessLookupError:
        pass


def replica_niceness(auth_token: str) -> dict[str, int]:
    """Nice value of each Serve replica process of the cluster whose token is ``auth_token``
    (its processes inherit it in their environment), by deployment name."""
    found = {}
    for pid in processes_with(f"RAY_AUTH_TOKEN={auth_token}"):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            if title.startswith("ray::ServeReplica:"):
                deployment = title.split(":")[-1].split(".")[0]
                found[deployment] = os.getpriority(os.PRIO_PROCESS, pid)
        except (OSError, ValueError):  # gone meanwhile
            continue
    return found


def serve_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "serve"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_serve_deploy_to_a_token_auth_cluster_then_requests_with_the_api_key(head_cluster):
    env, address, api_key, tmp = head_cluster
    http_port = free_port()
    config_path = tmp / "deploy.yaml"
    config_path.write_text(yaml.safe_dump(deploy_config(http_port, str(tmp / "models"))))

    # Token auth is on: the CLI with a wrong token is refused.
    wrong = serve_cli(
        {**env, "RAY_AUTH_TOKEN": "not-the-token"}, "deploy", str(config_path), "--address", address
    )
    assert wrong.returncode != 0
    assert "auth" in (wrong.stdout + wrong.stderr).lower()

    deployed = serve_cli(env, "deploy", str(config_path), "--address", address)
    assert deployed.returncode == 0, deployed.stderr
    url = f"http://127.0.0.1:{http_port}"
    wait_until(
        lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200,
        240,
        "the app to become healthy (engine start)",
        poll_s=0.5,
        ignore=NOT_UP_YET,
    )
    status = serve_cli(env, "status", "--address", address)
    assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout + status.stderr
    # The config's runtime_env puts the app's replicas at nice 0, not Ray's 15 (the cluster
    # was started without RAY_worker_niceness).
    assert replica_niceness(env["RAY_AUTH_TOKEN"]) == {"OpenAIIngress": 0, "EngineService": 0}

    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/v1/models").status_code == 401
        wrong_key = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong_key.status_code == 401
        assert wrong_key.json()["error"]["code"] == "invalid_api_key"
        assert wrong_key.headers["WWW-Authenticate"] == "Bearer"
        authorized = {"Authorization": f"Bearer {api_key}"}
        assert [m["id"] for m in http.get("/v1/models", headers=authorized).json()["data"]] == [
            MODEL
        ]
        completion = http.post(
            "/v1/completions",
            headers=authorized,
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True},
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 3
        unauthorized = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello"})
        assert unauthorized.status_code == 401
        # The scheduler timeline sits behind the same key; the schema routes are not served.
        assert http.get("/v1/flowprefill/timeline").status_code == 401
        timeline = http.get("/v1/flowprefill/timeline", headers=authorized)
        assert timeline.status_code == 200 and timeline.json()["requests"], timeline.text
        assert http.get("/openapi.json").status_code == 404
