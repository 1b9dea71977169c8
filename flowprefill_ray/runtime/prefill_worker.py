"""Prefill worker actor: one per GPU (or a configured number on CPU), model loaded once.

A threaded actor: control calls (preempt, discard, take_kv, stats) are served on Ray's call
threads while a unit computes on the worker's own compute thread (one thread, so one unit at a
time, and torch's per-thread state such as the CUDA stream stays put). ``run`` and ``resume``
block their call thread until the unit completes or pauses, so the scheduler simply awaits them.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch

from flowprefill_ray.model import load_tokenizer
from flowprefill_ray.model.prefix_cache import PrefixCache

from .config import ModelSource, PrefillConfig
from .kv_budget import measure_kv_budget
from .messages import PrefillItemSpec, UnitOutcome
from .metrics import RuntimeMetrics
from .model_source import checkpoint_path, load_source_model, torch_device
from .output_rules import OutputRules
from .prefill_executor import PrefillExecutor


class StaleSchedulerError(RuntimeError):
    """A call came from a scheduler that has since been replaced (see ``PrefillWorker.adopt``)."""


# Enough call threads that preempts, KV take-outs and stats never queue behind run/resume.
PREFILL_WORKER_CONCURRENCY = 32


class PrefillWorker:
    """Executes prefill work units for the scheduler; see the module docstring."""

    def __init__(
        self, worker_id: str, source: ModelSource, prefill: PrefillConfig, chunk_tokens: int
    ):
        torch.set_num_threads(prefill.torch_threads)
        self.worker_id = worker_id
        self.device = torch_device(source)
        path = checkpoint_path(source)
        self.model = load_source_model(source, path)
        # Measured before anything else allocates: on CUDA it is a share of what is free now.
        cache = prefill.prefix_cache
        self.kv_budget = measure_kv_budget(
            self.model,
            self.device,
            prefill.kv_memory,
            prefill.granularity,
            chunk_tokens,
            reserved_bytes=cache.budget_bytes if cache.enabled else 0,
        )
        # The same rules as the decode worker's (output_rules.py), so a request that ends
        # with its first token (EOS, max_tokens=1, a stop string) never reaches decode.
        rules = OutputRules.for_model(self.model, load_tokenizer(path))

        # "auto" becomes bounded run-ahead on CUDA (no stream sync per checkpoint), sync on CPU.
        self.checkpoint_sync = prefill.sync_mode(self.device.type)
        self.executor = PrefillExecutor(
            self.model,
            prefill.granularity,
            chunk_tokens,
            rules,
            checkpoint_sync=self.checkpoint_sync,
            max_run_ahead=prefill.max_run_ahead,
            prefix_cache=(
                PrefixCache(cache.block_tokens, cache.budget_bytes) if cache.enabled else None
            ),
            share_unsalted=cache.share_unsalted,
        )
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prefill-{worker_id}")
        self._metrics = RuntimeMetrics()
        # Which scheduler incarnation this worker serves (``adopt``). Calls stamped with another
        # epoch come from a scheduler that died: their unit ids mean nothing any more.
        self._epoch: int | None = None

    def info(self) -> dict:
        """Where this worker runs (the placement test checks the node)."""
        return {
            "worker_id": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "niceness": os.nice(0),  # placement.worker_niceness, applied by Ray
            "device": str(self.device),
            "checkpoint_sync": self.checkpoint_sync,
            "max_position_embeddings": self.model.config.max_position_embeddings,
        }

    def adopt(self, epoch: int) -> dict:
        """A (new or restarted) scheduler takes this worker over: everything the previous one
        left here - running, paused and finished units, KV waiting for hand-off - is dropped,
        and from now on only calls stamped with ``epoch`` are served. Returns what was dropped
        and, under ``kv_budget``, this worker's ``KVBudget`` (the policy's WorkerJoined)."""
        self._epoch = epoch
        return {**self._reporting(self.executor.reset), "kv_budget": self.kv_budget}

    def run(
        self, unit_id: int, items: list[PrefillItemSpec], epoch: int | None = None
    ) -> UnitOutcome:
        """Run a new unit; returns when it completed or paused."""
        return _ended(
            self._reporting(
                self._compute.submit(self._checked(epoch, self.executor.run), unit_id, items).result
            )
        )

    def resume(self, unit_id: int, epoch: int | None = None) -> UnitOutcome:
        """Continue a paused unit; returns when it completed or paused again."""
        return _ended(
            self._reporting(
                self._compute.submit(self._checked(epoch, self.executor.resume), unit_id).result
            )
        )

    def _reporting(self, call):
        """``call()``, then the held-bytes gauge: every change of what this worker holds
        passes through a unit ending, a discard, a KV take-out or a drop."""
        try:
            return call()
        finally:
            self._metrics.set(
                "flowprefill_prefill_held_bytes",
                self.executor.held_bytes(),
                worker_id=self.worker_id,
            )
            self._report_prefix_cache()

    def _report_prefix_cache(self) -> None:
        # The gauge reads 0 with the cache off, as its counters (zero-initialised) do.
        reuse = self.executor.prefix_reuse
        labels = {"worker_id": self.worker_id}
        queried, hit = reuse.new_counts()
        self._metrics.inc("flowprefill_prefix_cache_query_tokens_total", queried, **labels)
        self._metrics.inc("flowprefill_prefix_cache_hit_tokens_total", hit, **labels)
        nbytes = reuse.cache.nbytes if reuse.cache is not None else 0
        self._metrics.set("flowprefill_prefix_cache_bytes", nbytes, **labels)

    def preempt(self, unit_id: int, epoch: int | None = None) -> dict:
        """Stop ``unit_id`` at its next checkpoint; returns once it stopped, with the measured
        blocking time in seconds (``paused`` is False if the unit completed first)."""
        paused, blocking_s = self._checked(epoch, self.executor.request_pause)(unit_id)
        return {"paused": paused, "blocking_s": blocking_s}

    def discard(self, unit_id: int, epoch: int | None = None) -> bool:
        return self._reporting(lambda: self._checked(epoch, self.executor.discard)(unit_id))

    def _checked(self, epoch: int | None, call):
        """``call``, refused when it comes from a scheduler other than the current one. The
        check runs when the call starts (a run may have queued behind the unit computing while
        a new scheduler adopted this worker). ``epoch=None``: unchecked (tests, tools)."""

        def guarded(*args):
            if epoch is not None and epoch != self._epoch:
                raise StaleSchedulerError(
                    f"prefill worker {self.worker_id}: call from scheduler epoch {epoch}, "
                    f"now serving epoch {self._epoch}"
                )
            return call(*args)

        return guarded

    def take_kv(self, request_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The finished prompt's KV as ``(k, v)`` ``[layers, T, Hk, D]``. The scheduler calls
        this with the chosen tensor transport and hands the resulting ObjectRef to a decode
        worker, so the bytes go from here to the decode worker directly."""
        kv = self._reporting(lambda: self.executor.take_kv(request_id))
        return kv.k.contiguous(), kv.v.contiguous()

    def drop_request(self, request_id: str) -> int:
        return self._reporting(lambda: self.executor.drop_request(request_id))

    def stats(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),  # whose memory a soak samples (benchmarks/steady_load.py)
            "kv_budget_bytes": self.kv_budget.budget_bytes,
            "paused_budget_bytes": self.kv_budget.paused_budget_bytes,
            **self.executor.stats(),
        }

    def profile(self, token_counts: list[int], repeats: int = 2) -> list[tuple[int, float]]:
        """Time uninterrupted single-request prefills: ``[(tokens, median seconds)]``.

        Feeds the TTFT predictor; runs on the compute thread so it never overlaps a unit.
        """
        return self._compute.submit(self._profile, token_counts, repeats).result()

    def _profile(self, token_counts: list[int], repeats: int) -> list[tuple[int, float]]:
        rng = random.Random(0)
        vocab = self.model.config.vocab_size
        self._time_prefill([rng.randrange(vocab) for _ in range(min(token_counts))])  # warm-up
        points = []
        for count in token_counts:
            tokens = [rng.randrange(vocab) for _ in range(count)]
            times = [self._time_prefill(tokens) for _ in range(repeats)]
            points.append((count, statistics.median(times)))
        return points

    def _time_prefill(self, tokens: list[int]) -> float:
        started = time.perf_counter()
        # Timed as units run: the same checkpoint_sync, so the predictor sees their cost.
        state = self.model.start_prefill(
            [tokens],
            checkpoint_sync=self.checkpoint_sync,
            max_run_ahead=self.executor.max_run_ahead,
        )
        state.run(lambda: False)
        state.result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started


def _ended(outcome: UnitOutcome) -> UnitOutcome:
    """``outcome`` stamped with the wall-clock time it leaves the worker (a hop of the first
    token's path, request_clock.py)."""
    return dataclasses.replace(outcome, ended_wall_s=time.time())


RemotePrefillWorker = ray.remote(PrefillWorker)
# The same worker able to send its KV by Ray Direct Transport (gloo / nccl). A separate class
# because Ray fixes this at class definition and it moves all calls onto background threads.
RemotePrefillWorkerRDT = ray.remote(enable_tensor_transport=True)(PrefillWorker)
