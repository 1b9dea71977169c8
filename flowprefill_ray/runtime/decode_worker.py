"""Decode worker actor: continuous batching over a paged KV cache, tokens streamed per request.

An async actor. ``accept`` receives a request with the ObjectRef of its KV (produced by a
prefill worker; the bytes come straight from there) and queues it. One loop task admits queued
requests into the ``PagedKVCache`` and runs ``decode_step`` over every running sequence, one
token each, on a compute thread so that accept/stream/cancel calls are served meanwhile. Each
request's tokens go into its own asyncio queue, drained by the ``stream`` generator method.

Admission reserves blocks for ``prompt + max_tokens`` up front, so a running sequence never
finds the cache full mid-step (no decode-side preemption is needed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
import torch

from flowprefill_ray.model import load_tokenizer
from flowprefill_ray.model.decode import make_cache
from flowprefill_ray.model.generate import StopChecker
from flowprefill_ray.model.kv import KVCache
from flowprefill_ray.model.paged_kv import PagedKVCache
from flowprefill_ray.model.sampling import sample_with_params

from .config import DecodeConfig, ModelSource
from .detokenizer import Detokenizer
from .id_memory import remember
from .messages import AcceptAck, Handoff, TokenEvent
from .metrics import RuntimeMetrics
from .model_source import checkpoint_path, load_source_model, torch_device
from .output_rules import OutputRules

logger = logging.getLogger(__name__)

# Remember this many cancelled ids, so a hand-off that arrives after its cancel is dropped.
_CANCELLED_MEMORY = 4096
# Per-hand-off (bytes, seconds) samples kept for stats; totals are kept separately.
_TRANSFER_SAMPLES = 1000
# The pool of ``decode.kv_blocks: auto`` on CPU, where host memory is shared with everything
# else and no query says what is safe to take: the default of an explicit pool.
CPU_AUTO_KV_BLOCKS = 512


def kv_pool_blocks(
    model_config, dtype: torch.dtype, decode: DecodeConfig, free_bytes: int | None
) -> int:
    """Blocks in a decode worker's KV pool: ``decode.kv_blocks`` when it is a number; for
    "auto", ``kv_memory_fraction`` of ``free_bytes`` (GPU memory free after the weights
    loaded), or ``CPU_AUTO_KV_BLOCKS`` when ``free_bytes`` is None (CPU)."""
    if decode.kv_blocks != "auto":
        return decode.kv_blocks
    if free_bytes is None:
        return CPU_AUTO_KV_BLOCKS
    per_block = PagedKVCache.bytes_per_block(model_config, decode.block_size, dtype)
    blocks = int(free_bytes * decode.kv_memory_fraction) // per_block
    if blocks < 1:
        raise ValueError(
            f"decode.kv_blocks 'auto': {free_bytes / 2**30:.2f} GiB free x kv_memory_fraction "
            f"{decode.kv_memory_fraction} holds no {per_block}-byte KV block; free GPU memory "
            "or give decode.kv_blocks a number"
        )
    return blocks


def free_device_bytes(device: torch.device) -> int | None:
    """GPU memory this process could still allocate (None on CPU): free on the device plus
    what torch's caching allocator holds but no tensor uses (e.g. left by weight loading)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass
class _Sequence:
    handoff: Handoff
    checker: StopChecker
    detok: Detokenizer
    generator: torch.Generator | None
    kv: KVCache | None  # until admitted into the paged cache
    reserved_blocks: int
    last_token: int
    index: int = 0  # output index of last_token (the first token is 0)
    last_emit_s: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_id(self) -> str:
        return self.handoff.request_id


class DecodeWorker:
    """Continues requests after prefill; see the module docstring."""

    def __init__(self, worker_id: str, source: ModelSource, decode: DecodeConfig):
        torch.set_num_threads(decode.torch_threads)
        self.worker_id = worker_id
        self.config = decode
        path = checkpoint_path(source)
        self.device = torch_device(source)
        self.model = load_source_model(source, path)
        self.tokenizer = load_tokenizer(path)
        self.output_rules = OutputRules.for_model(self.model, self.tokenizer)
        blocks = kv_pool_blocks(
            self.model.config, self.model.dtype, decode, free_device_bytes(self.device)
        )
        self.cache = make_cache(self.model, blocks, decode.block_size)
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._reserved = 0  # blocks promised to running sequences (see module docstring)
        self._queues: dict[str, asyncio.Queue] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        # Ingress clients whose lease expired (cancel_client): a hand-off of theirs that lands
        # later is dropped like a cancelled request's.
        self._gone_clients: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{worker_id}")
        self._metrics = RuntimeMetrics()
        self._tokens_generated = 0
        self._steps = 0
        # Hand-off totals as running sums, plus only the latest samples: a list of every
        # hand-off grew without bound on a long-lived worker (seen as RSS creep in the soak).
        self._transfers = 0
        self._transfer_bytes = 0
        self._transfer_seconds = 0.0
        self._transfer_samples: deque[tuple[int, float]] = deque(maxlen=_TRANSFER_SAMPLES)
        # The scheduler picks decode workers by load; it hears ours on accept and, through
        # this handle, whenever requests finish (see _loop).
        self._load_listener = None
        self._load_changed = False

    # ------------------------------------------------------------------ control calls

    def report_load_to(self, scheduler) -> None:
        """Send load updates to ``scheduler.decode_load`` when requests finish."""
        self._load_listener = scheduler

    def info(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "niceness": os.nice(0),  # placement.worker_niceness, applied by Ray
            "kv_blocks": self.cache.num_blocks,
            "block_size": self.cache.block_size,
        }

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return self.cache.blocks_for(
            min(prompt_tokens + max_tokens, self.output_rules.context_tokens)
        )

    async def accept(self, handoff: Handoff, kv_refs: list) -> AcceptAck:
        """Take over a prefilled request. ``kv_refs[0]`` is the ObjectRef of its ``(k, v)``
        (nested in a list so that this worker, not Ray's argument resolution, times the fetch)."""
        started = time.perf_counter()
        try:
            k, v = await kv_refs[0]
        except Exception:
            # The KV never arrived (prefill worker died, KV dropped): end the client's stream.
            self._finish_queue(handoff.request_id, "error")
            raise
        return self._accept(handoff, k, v, time.perf_counter() - started)

    async def accept_direct(self, handoff: Handoff, kv: tuple) -> AcceptAck:
        """``accept`` for Ray Direct Transport: Ray has already moved ``kv = (k, v)`` here from
        the prefill worker (a borrowed RDT ref cannot be nested, so it comes resolved). The
        transfer is timed from the scheduler's wall-clock stamp (same node: same clock)."""
        k, v = kv
        return self._accept(handoff, k, v, max(0.0, time.time() - handoff.sent_at_wall_s))

    def _accept(self, handoff: Handoff, k, v, transfer_s: float) -> AcceptAck:
        kv = KVCache(k, v)
        self._transfers += 1
        self._transfer_bytes += kv.nbytes
        self._transfer_seconds += transfer_s
        self._transfer_samples.append((kv.nbytes, transfer_s))
        self._metrics.inc("flowprefill_kv_transfer_bytes_total", kv.nbytes)
        self._metrics.observe("flowprefill_kv_transfer_seconds", transfer_s)
        rid = handoff.request_id
        if rid in self._cancelled or handoff.client_id in self._gone_clients:
            self._finish_queue(rid, "abort")
        else:
            need = self.blocks_needed(handoff.prompt_tokens, handoff.sampling.max_tokens)
            if need > self.cache.num_blocks:
                # Can never fit; the engine's bounds should have refused it earlier.
                self._finish_queue(rid, "error")
            else:
                self._waiting.append(self._new_sequence(handoff, kv, need))
                self._ensure_loop()
                self._wake.set()
        return AcceptAck(
            rid, kv.nbytes, transfer_s, len(self._running), len(self._waiting), self.cache.usage
        )

    def _new_sequence(self, handoff: Handoff, kv: KVCache, need: int) -> _Sequence:
        params = handoff.sampling
        # The prefill worker decided the first token is not final; its text went out with it.
        checker, detok = self.output_rules.continue_after(
            params, handoff.prompt_tokens, handoff.first_token
        )
        generator = params.make_generator(self.device)
        if generator is not None and handoff.generator_state is not None:
            generator.set_state(
                torch.frombuffer(bytearray(handoff.generator_state), dtype=torch.uint8)
            )
        return _Sequence(handoff, checker, detok, generator, kv, need, handoff.first_token)

    async def stream(self, request_id: str):
        """Yield lists of ``TokenEvent`` for ``request_id`` as they are produced, ending with
        the one that carries a ``finish_reason``. Each yield carries every event ready then."""
        queue = self._queue(request_id)
        while True:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            yield events
            if events[-1].finish_reason is not None:
                self._queues.pop(request_id, None)
                return

    async def cancel(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; returns once they are free (True) or if the
        request was not here (False; a later hand-off of it is dropped)."""
        for seq in list(self._waiting):
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                self._finish_queue(request_id, "abort")
                return True
        seq = self._running.get(request_id)
        if seq is None:
            remember(self._cancelled, request_id, _CANCELLED_MEMORY)
            return False
        seq.cancelled = True
        self._wake.set()
        await seq.freed.wait()
        return True

    async def cancel_client(self, client_id: str) -> int:
        """Stop every request the ingress client ``client_id`` submitted (its lease expired:
        nobody reads their tokens) and drop its hand-offs still on their way; returns once
        their KV blocks are free, with how many were here."""
        remember(self._gone_clients, client_id, _CANCELLED_MEMORY)
        seqs = [*self._waiting, *self._running.values()]
        ids = [seq.request_id for seq in seqs if seq.handoff.client_id == client_id]
        await asyncio.gather(*(self.cancel(request_id) for request_id in ids))
        return len(ids)

    def stats(self) -> dict:
        """Load and counters; ``used_blocks`` lets tests check that nothing leaks."""
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),  # whose memory a soak samples (benchmarks/steady_load.py)
            "running": len(self._running),
            "waiting": len(self._waiting),
            "used_blocks": self.cache.used_blocks,
            "free_blocks": self.cache.free_blocks,
            "kv_usage": self.cache.usage,
            "reserved_blocks": self._reserved,
            "tokens_generated": self._tokens_generated,
            "steps": self._steps,
            "kv_transfers": self._transfers,
            "kv_transfer_bytes": self._transfer_bytes,
            "kv_transfer_seconds": self._transfer_seconds,
            "kv_transfer_samples": list(self._transfer_samples),
        }

    # --------------------------------------------------------------------- the loop

    def _queue(self, request_id: str) -> asyncio.Queue:
        queue = self._queues.get(request_id)
        if queue is None:
            queue = self._queues[request_id] = asyncio.Queue()
        return queue

    def _finish_queue(self, request_id: str, reason: str) -> None:
        self._queue(request_id).put_nowait(TokenEvent(request_id, None, -1, "", reason))

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._reap_cancelled()
            self._admit()
            self._report_load()
            if self._load_changed and self._load_listener is not None:
                self._load_changed = False
                # Fire and forget: a lost update is corrected by the next accept's reply. A
                # scheduler that is dead or restarting must not stop the decode loop: the
                # restarted one registers itself again (report_load_to).
                try:
                    self._load_listener.decode_load.remote(
                        self.worker_id, len(self._running), len(self._waiting), self.cache.usage
                    )
                except Exception:  # noqa: BLE001 - any failure only loses one update
                    logger.debug("load report to the scheduler failed", exc_info=True)
            batch = list(self._running.values())
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                tokens = await loop.run_in_executor(self._compute, self._step, batch)
            except Exception:
                # A failed step must not leave clients waiting forever: end the batch's
                # requests with "error" and keep serving the others.
                logger.exception(
                    "decode step failed on %s; ending %d request(s)", self.worker_id, len(batch)
                )
                for seq in batch:
                    self._finish_queue(seq.request_id, "error")
                    self._release(seq)
                continue
            self._steps += 1
            now = time.perf_counter()
            for seq, token in zip(batch, tokens, strict=True):
                if not seq.cancelled:
                    self._emit(seq, token, now)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_batch_size:
            seq = self._waiting[0]
            if self._reserved + seq.reserved_blocks > self.cache.num_blocks:
                break  # first come, first served: later ones wait behind it
            self._waiting.popleft()
            self.cache.add(seq.request_id, seq.kv)
            seq.kv = None
            self._reserved += seq.reserved_blocks
            seq.last_emit_s = time.perf_counter()
            self._running[seq.request_id] = seq

    def _step(self, batch: list[_Sequence]) -> list[int]:
        ids = [seq.request_id for seq in batch]
        logits = self.model.decode_step(ids, [seq.last_token for seq in batch], self.cache)
        params = [seq.handoff.sampling for seq in batch]
        tokens = sample_with_params(logits, params, [seq.generator for seq in batch])
        return [int(t) for t in tokens]

    def _emit(self, seq: _Sequence, token: int, now: float) -> None:
        checker = seq.checker
        kept_before = len(checker.token_ids)
        finished = checker.add(token)
        kept = len(checker.token_ids) > kept_before
        text = seq.detok.finish(checker.text) if finished else seq.detok.add(token)
        seq.index += 1
        seq.last_token = token
        self._tokens_generated += 1
        self._metrics.inc("flowprefill_generation_tokens_total")
        self._metrics.observe(
            "flowprefill_inter_token_latency_seconds",
            now - seq.last_emit_s,
            slo_class=seq.handoff.slo_class,
        )
        seq.last_emit_s = now
        reason = checker.finish_reason.value if finished else None
        event = TokenEvent(seq.request_id, token if kept else None, seq.index, text, reason)
        self._queue(seq.request_id).put_nowait(event)
        if finished:
            self._release(seq)

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._running.values() if s.cancelled]:
            self._finish_queue(seq.request_id, "abort")
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        self._running.pop(seq.request_id, None)
        self.cache.free(seq.request_id)
        self._reserved -= seq.reserved_blocks
        self._load_changed = True
        seq.freed.set()

    def _report_load(self) -> None:
        self._metrics.set(
            "flowprefill_decode_batch_size", len(self._running), worker_id=self.worker_id
        )
        self._metrics.set(
            "flowprefill_decode_requests_waiting", len(self._waiting), worker_id=self.worker_id
        )
        self._metrics.set(
            "flowprefill_decode_kv_usage_ratio", self.cache.usage, worker_id=self.worker_id
        )


RemoteDecodeWorker = ray.remote(DecodeWorker)
# Receives KV by Ray Direct Transport (see RemotePrefillWorkerRDT).
RemoteDecodeWorkerRDT = ray.remote(enable_tensor_transport=True)(DecodeWorker)
