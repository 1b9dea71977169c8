"""NVIDIA aiperf as a second, independent client in the vLLM peer comparison.

Our load generator measures every trial of ``peer_vllm.py``. So that its TTFT is not the only
word on a server we did not write, each system is also driven once by aiperf
(``scripts/aiperf_check.sh`` in its ``TARGET_URL`` mode: no server of its own) at one rate of
the grid, with a fixed prompt length equal to the trial's mean and the same output length;
``cross_check`` puts aiperf's TTFT percentiles beside ours at that rate. The workloads are not
identical (aiperf's synthetic prompts of one length against the trace's mixed lengths), so the
check is one of order of magnitude: both clients see the server alike, or one of them is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def aiperf_ttft_ms(artifacts: Path) -> dict[str, float] | None:
    """aiperf's time-to-first-token statistics (ms: avg, p50, p90, p99) from the
    ``profile_export_aiperf.json`` under ``artifacts``; ``None`` when there is none."""
    found = sorted(artifacts.rglob("profile_export_aiperf.json"))
    if not found:
        return None
    stats = _find_metric(json.loads(found[-1].read_text()), "time_to_first_token")
    if stats is None:
        return None
    return {k: float(stats[k]) for k in ("avg", "p50", "p90", "p99") if k in stats}


def _find_metric(node: Any, name: str) -> dict | None:
    """The statistics dict stored under key ``name`` anywhere in aiperf's export."""
    if isinstance(node, dict):
        value = node.get(name)
        if isinstance(value, dict) and "p50" in value:
            return value
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_metric(child, name)
        if found is not None:
            return found
    return None


def run_aiperf(
    url: str,
    model: str,
    rate_rps: float,
    prompt_tokens: int,
    output_tokens: int,
    requests: int,
    extra_inputs: dict[str, Any],
    tokenizer: Path,
    out_dir: Path,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Drive ``url`` with aiperf at ``rate_rps`` (``requests`` requests of ``prompt_tokens``
    in and ``output_tokens`` out, ``extra_inputs`` merged into each body; lengths counted with
    the tokenizer of the checkpoint directory ``tokenizer``); returns what it measured. A
    failure of aiperf is recorded, not raised."""
    env = {
        **os.environ,
        "TOKENIZER": str(tokenizer),
        "TARGET_URL": url,
        "MODEL": model,
        "REQUEST_RATE": f"{rate_rps:g}",
        "ISL": str(prompt_tokens),
        "OSL": str(output_tokens),
        "REQUESTS": str(requests),
        "EXTRA_INPUTS": json.dumps(extra_inputs),
        "OUT": str(out_dir.resolve()),
    }
    command = ["bash", str(REPO / "scripts" / "aiperf_check.sh")]
    try:
        done = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )
        error = None if done.returncode == 0 else done.stdout[-2000:] + done.stderr[-2000:]
    except subprocess.TimeoutExpired:
        error = f"aiperf ran past {timeout_s:g} s"
    return {
        "rate_rps": rate_rps,
        "isl": prompt_tokens,
        "osl": output_tokens,
        "requests": requests,
        "extra_inputs": extra_inputs,
        "ttft_ms": aiperf_ttft_ms(out_dir),
        "error": error,
    }


def cross_check(aiperf: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """aiperf's TTFT beside our load generator's at the same rate (ms), and their ratio."""
    ours = {k: (v * 1000 if v is not None else None) for k, v in trial["ttft_s"].items()}
    theirs = aiperf.get("ttft_ms") or {}
    ratio = (
        theirs["p50"] / ours["p50"] if theirs.get("p50") is not None and ours.get("p50") else None
    )
    return {"aiperf": aiperf, "loadgen_ttft_ms": ours, "p50_ratio_aiperf_over_loadgen": ratio}
