"""Placement on a multi-node cluster: two simulated nodes (ray.cluster_utils.Cluster).

The cluster runs in a child process because a test process can hold only one Ray connection
and the other runtime tests share a session-wide local cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.ray


def test_workers_spread_over_two_nodes_requests_complete_and_survive_a_worker_loss(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # Own process group, so that a hung child takes its Ray processes down with it.
    child = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
    assert child.returncode == 0, output[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())

    assert len(report["cluster_nodes"]) == 2
    prefill_nodes = {info["node_id"] for info in report["prefill"].values()}
    assert prefill_nodes == set(report["cluster_nodes"]), "both nodes should hold a prefill worker"
    assert report["completed"] == report["submitted"] == 6
    assert report["survived_worker_loss"], "a request on a killed worker did not finish elsewhere"
    # Both prefill workers did work: the global scheduler used the whole cluster.
    assert all(count >= 1 for count in report["units_completed"].values()), report


def _child(out_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from flowprefill_ray.runtime import FlowPrefillEngine, RuntimeConfig
    from flowprefill_ray.sampling_params import SamplingParams

    # Two nodes of 2 logical CPUs; a prefill worker takes 1.5, so each node gets one.
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    config = RuntimeConfig.model_validate(
        {
            "model": {"path": "tiny", "cache_dir": tempfile.mkdtemp()},
            "placement": {
                "num_prefill_workers": 2,
                "num_decode_workers": 1,
                "prefill_num_cpus": 1.5,
                "decode_num_cpus": 0.25,
                "strategy": "SPREAD",
                "scheduler_num_cpus": 0.1,
            },
            "prefill": {"profile_tokens": [16, 64, 128, 256], "profile_repeats": 1},
            "decode": {"kv_blocks": 256},
        }
    )

    async def run() -> dict:
        engine = await FlowPrefillEngine.start(config)
        sampling = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        prompts = [[(i * 7 + j) % 400 + 3 for j in range(600)] for i in range(6)]
        results = await asyncio.gather(*(engine.generate(p, sampling, "file") for p in prompts))
        stats = await engine.stats()
        prefill = {
            wid: await handle.info.remote() for wid, handle in engine.prefill_workers.items()
        }
        survived = await _kill_the_busy_worker(engine, sampling)
        await engine.shutdown()
        return {
            "survived_worker_loss": survived,
            "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "prefill": prefill,
            "submitted": len(prompts),
            "completed": sum(1 for outs in results if outs[-1].finish_reason == "length"),
            "units_completed": {
                wid: s["units_completed"] for wid, s in stats["prefill_workers"].items()
            },
        }

    try:
        report = asyncio.run(asyncio.wait_for(run(), timeout=180))
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


async def _kill_the_busy_worker(engine, sampling) -> bool:
    """Kill the prefill worker running a long request: the scheduler hears WorkerLeft, the
    policy re-queues the request, and it completes on the other worker."""
    import ray

    long = asyncio.ensure_future(
        engine.generate([5 + j % 300 for j in range(1800)], sampling, "file")
    )
    from waiting import async_wait_until  # the script runs with tests/ as sys.path[0]

    async def busy_worker():
        assert not long.done(), "the long request ended before a worker was seen running it"
        running = (await engine.stats())["scheduler"]["running_units"]
        return next((wid for wid, unit in running.items() if unit is not None), None)

    busy = await async_wait_until(
        busy_worker, 60, "a prefill worker to run the long request", poll_s=0.01
    )
    ray.kill(engine.prefill_workers[busy])
    outputs = await long
    left = (await engine.stats())["scheduler"]["prefill_workers"]
    return outputs[-1].finish_reason == "length" and busy not in left


if __name__ == "__main__":
    _child(sys.argv[1])
