"""The README's local command, `serve run --address local deployments/local.yaml`, as a user
runs it: it starts its own Ray instance even when an earlier run left a stale
``ray_current_cluster`` behind (plain `serve run` attaches to that address and hangs), serves,
and Ctrl-C stops it and everything it started within 10 s.

The shipped config with the tiny model (CI time) on a free port; Ray's temp dir is private to
the test (``RAY_TMPDIR``), so the stale file and the new instance touch nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest_ray import free_port, processes_with
from waiting import wait_until

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
SERVE = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "serve"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def private_tmp():
    # Short: Ray's socket paths under it must stay within the 107-byte limit of AF_UNIX.
    path = tempfile.mkdtemp(prefix="fpsr", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_serve_run_address_local_ignores_a_stale_cluster_and_stops_on_ctrl_c(
    private_tmp, runtime_cache_dir
):
    stale = Path(private_tmp) / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text("127.0.0.1:1\n")  # a cluster that is gone: nothing listens there
    port = free_port()
    config = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    runtime = config["applications"][0]["args"]["runtime"]
    runtime["model"] = {"path": "tiny", "cache_dir": runtime_cache_dir}
    runtime["prefill"] = {"profile_tokens": [16, 64, 256, 512], "profile_repeats": 1}
    runtime["placement"]["prefill_num_cpus"] = 0.5
    config_path = Path(private_tmp) / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_TMPDIR": private_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    log = open(Path(private_tmp) / "serve.log", "w")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [str(SERVE), "run", "--address", "local", str(config_path)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # As in a terminal: SIGINT acted on. A run of the suite as a background job (bash
        # without job control) ignores SIGINT, and a child inherits that across exec.
        preexec_fn=_sigint_default,
    )  # fmt: skip
    try:

        def serve_log() -> str:
            return (Path(private_tmp) / "serve.log").read_text()[-3000:]

        def healthy() -> bool:
            assert serve.poll() is None, f"serve run exited early:\n{serve_log()}"
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200

        wait_until(
            healthy,
            240,
            lambda: f"/health to answer 200; serve.log ends:\n{serve_log()}",
            poll_s=0.5,
            ignore=(httpx.HTTPError,),
        )
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "flowprefill-tiny", "prompt": "Hello", "max_tokens": 2})  # fmt: skip
        assert answer.status_code == 200, answer.text

        # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        stopped_at = time.monotonic()
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(timeout=30)
        took_s = time.monotonic() - stopped_at
        assert took_s < 10.0, took_s

        def leftover() -> list[int]:
            return [p for p in processes_with(f"RAY_TMPDIR={private_tmp}") if _alive(p)]

        # Ray's own processes exit right after serve run's.
        wait_until(
            lambda: not leftover(),
            5,
            lambda: f"Ray's processes to exit (left: {leftover()})",
            poll_s=0.1,
        )
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
