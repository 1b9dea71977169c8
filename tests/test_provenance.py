"""The command line benchmarks record in their JSON (benchmarks/provenance.py), and the one
`bench` runs by default."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _provenance():
    # benchmarks/ is a folder of scripts, not a package: load the module by path.
    spec = importlib.util.spec_from_file_location(
        "provenance", ROOT / "benchmarks" / "provenance.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paths_in_the_repository_are_written_from_its_root_and_words_quoted(monkeypatch):
    provenance = _provenance()
    monkeypatch.setattr(sys, "executable", str(ROOT / ".venv" / "bin" / "python"))
    line = provenance.command_line(
        ROOT / "benchmarks" / "policy_goodput.py", ["--out", "results/a b.json"]
    )
    assert line == ".venv/bin/python benchmarks/policy_goodput.py --out 'results/a b.json'"
    assert shlex.split(line)[-1] == "results/a b.json"  # pastes back to the same words


def test_an_interpreter_outside_the_repository_keeps_its_absolute_path(monkeypatch):
    provenance = _provenance()
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--tiny"])
    line = provenance.command_line(ROOT / "benchmarks" / "x.py")  # no argv: the process's own
    assert line == "/usr/bin/python3 benchmarks/x.py --tiny"


def test_a_benchmark_records_the_command_that_reruns_it(tmp_path):
    """policy_goodput.py at a tiny size (simulation only, under a second): the recorded line,
    pasted back into a shell at the repository root, writes the same file again."""
    out = tmp_path / "goodput.json"
    argv = [
        "--requests", "30", "--traces", "azure_2023_conv", "--cost-models", "tiny_cpu",
        "--workers", "1", "--chunk-sizes", "512", "--out", str(out),
    ]  # fmt: skip
    script = ROOT / "benchmarks" / "policy_goodput.py"
    subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, check=True, timeout=120)
    command = json.loads(out.read_text())["command"]
    assert shlex.split(command)[1:] == ["benchmarks/policy_goodput.py", *argv]
    out.unlink()
    subprocess.run(command, shell=True, cwd=ROOT, check=True, timeout=120)
    assert json.loads(out.read_text())["command"] == command


def test_bench_without_arguments_runs_the_documented_tiny_model_bisection():
    """`python -m flowprefill_ray bench` expands to BENCH_DEFAULTS; they must stay flags that
    benchmarks/live_policies.py accepts, with the meaning docs/BENCHMARKS.md gives them."""
    from flowprefill_ray.__main__ import BENCH_DEFAULTS

    spec = importlib.util.spec_from_file_location(
        "live_policies", ROOT / "benchmarks" / "live_policies.py"
    )
    live_policies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live_policies)
    args = live_policies.parse_args(list(BENCH_DEFAULTS))
    assert args.tiny and args.simulate and args.mode == "search"
    assert (args.max_requests, args.max_prompt_tokens, args.slo_scale) == (160, 4096, 3.0)
    assert args.policies.split(",") == list(live_policies.POLICIES)


def test_the_machine_names_its_cpu_model_and_vector_extensions(tmp_path):
    provenance = _provenance()
    cpuinfo = tmp_path / "cpuinfo"
    core = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"
    cpuinfo.write_text(core * 2)  # one block per core
    assert provenance.cpu_model(cpuinfo) == {
        "cpu_model": "AMD EPYC",
        "cpu_vector_flags": ["avx2", "avx512f", "avx512_vnni"],
    }
    assert provenance.cpu_model(tmp_path / "absent") == {}
    recorded = provenance.machine()
    assert {"arch", "cores", "load_avg_before", "load_avg_after"} <= set(recorded)
