"""CPU seconds each kind of process on this host used over a window (where a trial's CPU went).

On a 2-core machine every process of a server competes with the model for the same cores: a
proxy or an ingress that burns half a core on streaming tokens slows the prefill as surely as
a slower kernel. ``CpuWindow`` snapshots every process's CPU time (user + system) when it
starts and when it ends, and sums the difference per *kind* of process:

- Ray workers by their actor (``ray::ProxyActor``, ``ray::ServeReplica:app:OpenAIIngress``,
  ``ray::PrefillWorker``...; Ray retitles a worker with the method it runs, which is dropped);
- other Python processes by their script or module (``vllm.entrypoints.openai.api_server``);
- anything else by its executable's name (``raylet``, ``gcs_server``).

A process that started inside the window counts from zero; one that ended inside it is lost
(its last seconds are not seen), so short-lived helpers are undercounted. Kinds under
``min_cpu_s`` are summed under ``other``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil


def process_kind(cmdline: list[str], name: str) -> str:
    """The kind a process is counted under (see the module docstring)."""
    if cmdline and cmdline[0].startswith("ray::"):
        title = cmdline[0].split()[0]
        actor, _, _method = title.partition(".")
        return actor
    if cmdline and os.path.basename(cmdline[0]).startswith("python"):
        args = [a for a in cmdline[1:] if not a.startswith("-")]
        if "-m" in cmdline[1:]:
            module = cmdline[cmdline.index("-m") + 1 :]
            return module[0] if module else name
        return os.path.basename(args[0]) if args else name
    return name


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    seen: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["cmdline", "name", "cpu_times"]):
        info = proc.info
        times = info.get("cpu_times")
        if times is None:
            continue
        kind = process_kind(info.get("cmdline") or [], info.get("name") or "?")
        seen[proc.pid] = (kind, times.user + times.system)
    return seen


class CpuWindow:
    """``with CpuWindow() as window: ...`` then ``window.result()``: CPU seconds per kind of
    process over the block, the block's wall seconds and the host's core count."""

    def __init__(self, min_cpu_s: float = 0.5):
        self.min_cpu_s = min_cpu_s
        self._start: dict[int, tuple[str, float]] = {}
        self._end: dict[int, tuple[str, float]] = {}
        self._wall: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> CpuWindow:
        self._start = _cpu_by_pid()
        self._wall = (time.perf_counter(), 0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = _cpu_by_pid()
        self._wall = (self._wall[0], time.perf_counter())

    def result(self) -> dict[str, Any]:
        used: dict[str, float] = {}
        for pid, (kind, cpu) in self._end.items():
            before = self._start.get(pid)
            # A reused pid of another kind is a new process: count it from zero.
            base = before[1] if before is not None and before[0] == kind else 0.0
            used[kind] = used.get(kind, 0.0) + max(0.0, cpu - base)
        wall = self._wall[1] - self._wall[0]
        kept = {k: v for k, v in used.items() if v >= self.min_cpu_s}
        other = sum(v for k, v in used.items() if k not in kept)
        by_kind = dict(sorted(kept.items(), key=lambda kv: -kv[1]))
        if other > 0:
            by_kind["other"] = other
        return {
            "wall_s": wall,
            "cores": psutil.cpu_count(),
            "cpu_s_total": sum(used.values()),
            "cpu_s_by_kind": by_kind,
        }
