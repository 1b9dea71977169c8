"""The main job (``python -m flowprefill_ray demo``) end to end, as a user runs it.

It runs in a subprocess, like the README's command: a local Ray cluster, the Serve app with the
tiny model, a replay of a few Azure-trace requests over HTTP, the report and the plots. The
subprocess carries a unique environment marker that every Ray process it starts inherits;
after it exits, no process with that marker may be left (Serve and Ray were shut down).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest_ray import free_port, processes_with
from waiting import wait_until

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find leftovers")
def test_demo_serves_a_trace_slice_reports_and_shuts_everything_down(tmp_path):
    marker = f"FLOWPREFILL_DEMO_TEST={uuid.uuid4().hex}"
    env = dict(os.environ, FLOWPREFILL_DEMO_TEST=marker.split("=", 1)[1])
    out = tmp_path / "demo"
    command = [
        sys.executable,
        "-m",
        "flowprefill_ray",
        "demo",
        "--tiny",
        "--requests",
        "6",
        "--rate-scale",
        "2",
        "--port",
        str(free_port()),
        "--out",
        str(out),
        "--no-progress",
        "--drain",
        "20",
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The compact report: one line per class seen plus the total, and a goodput estimate.
    assert "ttft_p50" in proc.stdout and "\nALL " in proc.stdout
    assert "goodput estimate:" in proc.stdout
    document = json.loads((out / "results.json").read_text())
    requests = document["requests"]
    assert len(requests) == 6 and document["summary"]["sent"] == 6
    # Every request went through the real server: a first token, server-side timings, and
    # a TTFT measured by the client no smaller than the server's own.
    for r in requests:
        assert r["status"] == "ok", r
        assert r["output_tokens"] >= 1 and r["ttft_s"] > 0
        assert 0 < r["server"]["ttft_s"] <= r["ttft_s"]
        assert r["server"]["slo_class"] == r["slo_class"]
    assert len({r["slo_class"] for r in requests}) > 1  # mixed SLO classes
    for png in ("ttft_cdf.png", "burst_timeline.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Nothing the demo started survives it.
    wait_until(
        lambda: not processes_with(marker),
        20,
        lambda: f"the demo's processes to exit (left behind: {processes_with(marker)})",
        poll_s=0.5,
    )
