"""benchmarks/process_cpu.py: where a trial's CPU went, per kind of process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from repo_scripts import load_script

process_cpu = load_script("benchmarks/process_cpu.py")


@pytest.mark.parametrize(
    ("cmdline", "name", "kind"),
    [
        (["ray::PrefillWorker.run"], "ray::PrefillW", "ray::PrefillWorker"),
        (
            ["ray::ServeReplica:flowprefill:OpenAIIngress"],
            "ray::ServeRep",
            "ray::ServeReplica:flowprefill:OpenAIIngress",
        ),
        (["ray::ProxyActor"], "ray::ProxyActo", "ray::ProxyActor"),
        (
            ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--port", "1"],
            "python",
            "vllm.entrypoints.openai.api_server",
        ),
        (
            ["/v/bin/python3.11", "benchmarks/peer_vllm.py", "--cores", "0-1"],
            "python3.11",
            "peer_vllm.py",
        ),
        (["/usr/bin/raylet", "--node"], "raylet", "raylet"),
        ([], "kworker/0:1", "kworker/0:1"),
    ],
)
def test_processes_are_counted_under_their_actor_script_or_name(cmdline, name, kind):
    assert process_cpu.process_kind(cmdline, name) == kind


def test_a_busy_process_is_counted_under_its_script_with_the_cpu_it_spent(tmp_path):
    """A child that spins 0.6 s of CPU inside the window, then waits (alive) until the window
    has closed, shows up under its script's name with about that much CPU."""
    script = tmp_path / "spin_for_cpu_test.py"
    script.write_text(
        "import sys, time\n"
        "end = time.process_time() + 0.6\n"
        "while time.process_time() < end:\n"
        "    pass\n"
        "print('spun', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        with process_cpu.CpuWindow(min_cpu_s=0.1) as window:
            assert child.stdout.readline().strip() == "spun"
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    result = window.result()
    spent = result["cpu_s_by_kind"]["spin_for_cpu_test.py"]
    # The child may have spun a little before the first snapshot; never more than it spun.
    assert 0.3 <= spent <= 0.6 + 0.2
    assert result["wall_s"] >= spent * 0.5 and result["cores"] >= 1
    assert result["cpu_s_total"] >= sum(result["cpu_s_by_kind"].values()) - 1e-6
