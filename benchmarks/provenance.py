"""The command line a benchmark records in its JSON, in the form a reader can paste.

Every result file says how it was made as the docs show commands:
``.venv/bin/python benchmarks/policy_goodput.py --requests 4000 --out results/x.json``, to be run
from the repository root. Paths inside the repository are written relative to it (so the line
works in any checkout); an interpreter outside it (a system Python on a GPU machine) keeps its
absolute path. Words are shell-quoted, so a value with spaces survives the paste.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).absolute().parent.parent
# When this benchmark started and how loaded the machine was then (this module is imported
# at a benchmark's start): a figure measured on a busy machine says so in its JSON.
STARTED_AT = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
LOAD_BEFORE = os.getloadavg()


def _from_repo_root(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it, else absolute.

    Symlinks are not resolved first: a venv's ``bin/python`` links to the base interpreter,
    and the venv's own path is the one that runs with the venv's packages.
    """
    path = Path(path).absolute()
    for root in (REPO_ROOT, REPO_ROOT.resolve()):
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def command_line(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The shell command that reruns this benchmark from the repository root.

    ``script``: the benchmark's ``__file__``. ``argv``: the arguments its ``main`` was given;
    ``None`` means this process's own (``sys.argv[1:]``), as when run from the shell.
    """
    interpreter = _from_repo_root(sys.executable) if sys.executable else "python"
    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([interpreter, _from_repo_root(script), *arguments])


def write_report(
    out: str | Path, script: str | Path, argv: Sequence[str] | None, benchmark: str, **fields
) -> Path:
    """Write a benchmark's JSON: its name, the command that reruns it (``command_line``), the
    Python and machine it ran on, then ``fields``; says where on stdout. Returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": benchmark,
        "command": command_line(script, argv),
        "commit": commit(),
        "started_at": STARTED_AT,
        "python": platform.python_version(),
        "machine": machine(),
        **fields,
    }
    path.write_text(json.dumps(document, indent=2))
    print(f"wrote {path}")
    return path


def measured_run(run_json: str | None) -> dict:
    """For a script that reads what a benchmark run left (its timelines): ``run_json``, that
    run's JSON, and ``run_commit``, the commit the run measured (None without a run JSON)."""
    run = json.loads(Path(run_json).read_text()) if run_json else {}
    return {"run_json": run_json, "run_commit": run.get("commit")}


def commit() -> str:
    """The commit measured: the checkout's commit when this benchmark started (``COMMIT``).

    Taken at the start, not when the JSON is written: a run of an hour must not record
    whatever was committed while it ran."""
    return COMMIT


def _head_commit() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it (the figure
    then belongs to uncommitted code); ``unknown`` outside a checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


COMMIT = _head_commit()


def machine() -> dict:
    """Architecture, CPU model and vector extensions, cores and the load average (1, 5,
    15 min) at start and now."""
    return {
        "arch": platform.machine(),
        **cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in LOAD_BEFORE],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


# Matmul speed on CPU hangs on these (oneDNN picks its kernels by them): two machines of one
# "kind" spent 1.4x apart in prefill CPU seconds on the same trial (docs/BENCHMARKS.md, run 7).
_VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """``cpu_model`` and the ``cpu_vector_flags`` of ``_VECTOR_FLAGS`` it has, read from
    Linux's ``cpuinfo``; empty where there is none (another OS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields = {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if key.strip() in ("model name", "flags")
    }
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name", ""),
        "cpu_vector_flags": [flag for flag in _VECTOR_FLAGS if flag in flags],
    }
