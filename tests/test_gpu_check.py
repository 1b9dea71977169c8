"""benchmarks/gpu_check.py without a GPU: its command line, the live-runtime part run for real
on CPU (tiny model, a private Ray cluster, a preemption), and the GPU runtime configuration it
would use, validated by the project's config models."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowprefill_ray.model import ModelConfig
from flowprefill_ray.model.checkpoints import tiny_checkpoint
from flowprefill_ray.model.weights import expected_shapes

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def runtime_check(gpu_check):
    return sys.modules["gpu_runtime_check"]  # imported by gpu_check from benchmarks/


def test_one_command_writes_to_docs_results_and_parts_can_be_skipped(gpu_check):
    args = gpu_check.parse_args([])
    assert args.out == ROOT / "docs" / "results" / "gpu_check.json"
    assert not (args.skip_kernels or args.skip_pause or args.skip_runtime or args.dry_run)
    args = gpu_check.parse_args(["--skip-kernels", "--skip-pause", "--skip-runtime"])
    assert args.skip_kernels and args.skip_pause and args.skip_runtime


def test_parameter_count_matches_the_written_checkpoint(runtime_check, tmp_path):
    spec = runtime_check.DRY_RUNTIME_MODEL
    path = tiny_checkpoint(
        tmp_path / "m",
        num_layers=spec.layers,
        hidden=spec.hidden,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        intermediate=spec.intermediate,
        vocab=spec.vocab,
    )
    shapes = expected_shapes(ModelConfig.from_pretrained(path)).values()
    assert runtime_check.parameters(spec) == sum(math.prod(shape) for shape in shapes)
    # The GPU run serves a ~1B model in bf16 with the Triton kernels.
    gpu = runtime_check.GPU_RUNTIME_MODEL
    assert 0.9e9 < runtime_check.parameters(gpu) < 1.3e9
    assert (gpu.dtype, gpu.kernels) == ("bfloat16", "triton")


def test_gpu_runtime_configs_validate_with_gpu_defaults(runtime_check, tmp_path):
    path = tiny_checkpoint(tmp_path / "m")
    spec = runtime_check.GPU_RUNTIME_MODEL
    cuda = torch.device("cuda")  # only its type is read: no GPU needed to build the config
    one_gpu = runtime_check.runtime_config(spec, path, cuda, "object_store")
    assert one_gpu.model.device == "cuda" and one_gpu.model.dtype == "bfloat16"
    assert one_gpu.prefill.sync_mode("cuda") == "bounded"
    assert one_gpu.decode.kv_blocks == "auto"
    # Both workers on the one GPU: only the prefill worker reserves it from Ray.
    assert (one_gpu.placement.prefill_num_gpus, one_gpu.placement.decode_num_gpus) == (1, 0)
    assert max(one_gpu.prefill.profile_tokens) >= spec.long_tokens
    two_gpus = runtime_check.runtime_config(spec, path, cuda, "nccl")
    assert two_gpus.kv_transfer.mode == "nccl" and two_gpus.placement.decode_num_gpus == 1


@pytest.mark.ray
def test_dry_run_serves_the_tiny_model_live_with_a_preemption(tmp_path):
    """The runtime part for real on CPU: its own Ray cluster (a subprocess, so it never meets
    the test session's), an urgent request preempting a long one, a burst."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_check.py"),
            "--dry-run",
            "--skip-kernels",
            "--skip-pause",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    live = report["runtime"]["object_store"]
    assert live["ok"] and live["long_preemptions"] >= 1 and live["urgent_first"]
    assert live["first_token_match"] and live["burst_completed"] == live["burst_requests"]
    assert live["checkpoint_sync"] == "sync"  # auto on CPU
    assert live["decode_kv_blocks"] == 512  # kv_blocks auto on CPU: the documented default
    assert "nccl" not in report["runtime"] and "two GPUs" in report["runtime_skipped"]["nccl"]
    assert "live runtime, kv_transfer object_store" in done.stdout
