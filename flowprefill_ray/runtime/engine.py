"""``FlowPrefillEngine``: the Python API of the runtime; works without Serve, Serve wraps it.

    engine = await FlowPrefillEngine.start(RuntimeConfig(...))   # on the current Ray cluster
    async for out in engine.submit("Hello", SamplingParams(max_tokens=16), slo="text"):
        print(out.text, end="")
    await engine.shutdown()

Tokenization happens here, on the client side: it is cheap, it keeps the scheduler's event
loop free for decisions, and a bad prompt is refused before it costs the cluster anything.
The first token comes from the scheduler as soon as the prefill completes (before the KV has
reached a decode worker); the rest stream straight from the decode worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace

import ray
from ray.exceptions import RayActorError, RayTaskError

from flowprefill_ray.model import ModelConfig, load_tokenizer
from flowprefill_ray.model.decode import context_limit
from flowprefill_ray.model.generate import StopChecker, eos_token_ids
from flowprefill_ray.model.sampling import SamplingParams
from flowprefill_ray.scheduling import TTFTPredictor
from flowprefill_ray.scheduling.predictor import PredictorConfig

from .config import RuntimeConfig
from .deadline import RequestDeadline
from .detokenizer import Detokenizer
from .errors import (
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
    RequestRejectedError,
    RequestTimeoutError,
    RuntimeEngineError,
)
from .messages import PrefillDone, TokenEvent
from .metrics import RuntimeMetrics
from .model_source import checkpoint_path
from .placement import Workers, create_workers, destroy_workers
from .reconcile import disagreements
from .scheduler import RemoteScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One streamed output token (or the final event) of a request.

    ``token_id`` is None on a final event that carries no token (EOS, a stop string, abort).
    ``text`` is the text delta. Times in seconds, measured by this client: ``ttft_s`` from
    ``submit`` to the first token, ``tpot_s`` the mean time per output token after the first
    so far. ``queue_s`` (arrival to first run) and ``preemptions`` come from the scheduler.
    ``slo_class``/``ttft_slo_s`` are what the request is served under; ``downgraded_from`` names
    the class it asked for when admission control moved it to a looser one (else None).
    """

    request_id: str
    token_id: int | None
    text: str
    index: int
    finish_reason: str | None
    ttft_s: float
    tpot_s: float | None
    queue_s: float
    preemptions: int
    slo_class: str
    ttft_slo_s: float
    downgraded_from: str | None = None


class RequestStream:
    """The token stream of one submitted request: an async iterator of ``TokenOutput``.

    Awaiting it returns itself, so ``stream = await engine.submit(...)`` works as well as
    ``async for out in engine.submit(...)``. ``aclose()`` abandons the request (cancels it).
    """

    def __init__(self, request_id: str, outputs: AsyncIterator[TokenOutput]):
        self.request_id = request_id
        self._outputs = outputs

    def __await__(self):
        return self._itself().__await__()

    async def _itself(self) -> RequestStream:
        return self

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenOutput:
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        await self._outputs.aclose()


class FlowPrefillEngine:
    """Client of a running FlowPrefill deployment (scheduler, prefill and decode workers)."""

    def __init__(
        self, config: RuntimeConfig, scheduler, workers: Workers | None, tokenizer, model_config
    ):
        self.config = config
        self._scheduler = scheduler
        self._workers = workers  # None when attached to actors another engine owns
        self.tokenizer = tokenizer
        self.model_config = model_config
        self._context = context_limit(model_config)
        # eos_token_ids reads model.config; the engine holds only the config.
        self._eos_ids = eos_token_ids(SimpleNamespace(config=model_config), tokenizer)
        self.max_prompt_tokens = max_prompt_tokens(config, self._context)
        # What one decode worker can ever hold (prompt + output), tokens.
        self._decode_capacity = config.decode.kv_blocks * config.decode.block_size
        self._in_decode: dict[str, object] = {}  # request id -> decode worker handle
        self._decode_handles: dict[str, object] = {}  # decode worker id -> handle
        self._in_flight: set[str] = set()
        self._metrics = RuntimeMetrics()
        # Every class's request counters exist at 0 from start-up (the scheduler's too: they
        # sum across processes), so per-class panels and alerts see classes that never missed,
        # were never rejected or never failed. The preemption counter per worker when this
        # engine owns the workers.
        self._metrics.zero_init(
            slo_class=config.slo.class_names, worker_id=list(workers.prefill) if workers else ()
        )
        self._closed = False

    # ------------------------------------------------------------------- lifecycle

    @classmethod
    async def start(cls, config: RuntimeConfig | dict | None = None) -> FlowPrefillEngine:
        """Create the workers and the scheduler on the current Ray cluster and wait until every
        worker has loaded its model. Needs ``ray.init`` first."""
        config = _validated(config)
        if not ray.is_initialized():
            raise EngineUnavailableError(
                "Ray is not initialized: call ray.init(...) before FlowPrefillEngine.start"
            )
        path = checkpoint_path(config.model)  # generate/convert once here, not in every worker
        model_config = ModelConfig.from_pretrained(path)
        workers = await asyncio.to_thread(create_workers, config)
        try:
            predictor = await _predictor(
                config, workers, max_prompt_tokens(config, context_limit(model_config))
            )
            scheduler = RemoteScheduler.options(
                name=config.scheduler_name,
                namespace=config.namespace,
                num_cpus=config.placement.scheduler_num_cpus,
                max_concurrency=100_000,
                max_restarts=config.faults.scheduler_max_restarts,
                # A call in flight on a dead scheduler fails instead of being retried: the
                # restarted one has no record of the request (the client sees 503 and retries).
                max_task_retries=0,
            ).remote(config, predictor, workers.prefill, workers.decode)
            await scheduler.start.remote()
            if config.kv_transfer.mode != "object_store":
                await scheduler.setup_kv_transport.remote()
        except BaseException:
            destroy_workers(workers)
            raise
        return cls(config, scheduler, workers, load_tokenizer(path), model_config)

    @classmethod
    async def connect(cls, config: RuntimeConfig | dict | None = None) -> FlowPrefillEngine:
        """Attach to the scheduler another engine started (same ``namespace``/``name_prefix``),
        e.g. from a second Serve replica. ``shutdown`` of this engine leaves the actors alone."""
        config = _validated(config)
        try:
            scheduler = ray.get_actor(config.scheduler_name, namespace=config.namespace)
        except ValueError:
            raise EngineUnavailableError(
                f"no scheduler {config.scheduler_name!r} in namespace {config.namespace!r}"
            ) from None
        path = checkpoint_path(config.model)
        return cls(config, scheduler, None, load_tokenizer(path), ModelConfig.from_pretrained(path))

    async def shutdown(self) -> None:
        """Stop accepting requests; if this engine created the actors, remove them."""
        if self._closed:
            return
        self._closed = True
        if self._workers is None:
            return
        try:
            await self._scheduler.close.remote()
        except RayActorError:
            pass
        ray.kill(self._scheduler, no_restart=True)
        await asyncio.to_thread(destroy_workers, self._workers)

    @property
    def prefill_workers(self) -> dict[str, object]:
        return dict(self._workers.prefill) if self._workers else {}

    @property
    def decode_workers(self) -> dict[str, object]:
        return dict(self._workers.decode) if self._workers else {}

    # --------------------------------------------------------------------- requests

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Prompt token ids: a string is encoded with the model's tokenizer (special tokens as
        the tokenizer adds them); a list of ids is checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
                )
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def _check(
        self, ids: list[int], sampling: SamplingParams, slo: str | float | None
    ) -> tuple[str, float | None]:
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.max_prompt_tokens)
        bounds = self.config.requests
        if sampling.max_tokens > bounds.max_output_tokens:
            raise InvalidRequestError(
                f"max_tokens={sampling.max_tokens} is above this server's limit of {bounds.max_output_tokens}"
            )
        if min(len(ids) + sampling.max_tokens, self._context) > self._decode_capacity:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceed a decode "
                f"worker's KV capacity of {self._decode_capacity} tokens"
            )
        slo_config = self.config.slo
        if slo is None:
            return slo_config.default_class, None
        if isinstance(slo, str):
            if slo not in slo_config.class_names:
                raise InvalidRequestError(
                    f"unknown SLO class {slo!r}; known classes: {slo_config.class_names}"
                )
            return slo, None
        if isinstance(slo, bool) or not isinstance(slo, (int, float)) or not slo > 0:
            raise InvalidRequestError(
                f"slo must be a class name or a positive TTFT in seconds, got {slo!r}"
            )
        return slo_config.default_class, float(slo)

    def submit(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        slo: str | float | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> RequestStream:
        """Start a request; iterate the result to receive its tokens as they are produced.

        ``async for out in engine.submit(...)`` and ``stream = await engine.submit(...)`` both
        work. ``slo``: an SLO class name, an explicit TTFT target in seconds, or None (the
        default class). ``timeout_s`` bounds the whole request (seconds; None = the configured
        ``requests.request_timeout_s``); past it the request fails with RequestTimeoutError and
        what it held is released. Validation errors are raised by this call itself, before anything
        reaches the cluster. Abandoning the stream (``aclose``, or the consumer's task being
        cancelled) cancels the request.
        """
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        sampling = sampling or SamplingParams()
        ids = self.tokenize(prompt)
        slo_class, ttft_slo_s = self._check(ids, sampling, slo)
        if len(self._in_flight) >= self.config.requests.max_in_flight:
            # A 429 like the scheduler's admission rejections, so counted with them.
            self._metrics.inc("flowprefill_requests_rejected_total", slo_class=slo_class)
            raise RequestRejectedError(request_id or "-", "too many requests in flight", 1.0)
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidRequestError(f"timeout_s must be positive seconds, got {timeout_s!r}")
        timeout_s = timeout_s if timeout_s is not None else self.config.requests.request_timeout_s
        request_id = request_id or uuid.uuid4().hex
        return RequestStream(
            request_id, self._stream(request_id, ids, sampling, slo_class, ttft_slo_s, timeout_s)
        )

    async def _stream(
        self, request_id, ids, sampling, slo_class, ttft_slo_s, timeout_s
    ) -> AsyncIterator[TokenOutput]:
        started = time.monotonic()
        finished = False
        done = None
        bound = RequestDeadline(request_id, timeout_s, started)
        self._in_flight.add(request_id)
        try:
            done = await bound.wait(
                self._call(
                    self._scheduler.submit.remote(request_id, ids, sampling, slo_class, ttft_slo_s)
                )
            )
            if done is None:  # cancelled before its first token
                finished = True
                self._count_finished(slo_class, "abort")
                yield self._output(done, request_id, None, "", 0, "abort", started, None, slo_class)
                return
            first_at = time.monotonic()
            ttft_s = first_at - started
            if ttft_s > done.ttft_slo_s:
                # A miss as the client sees it: the timeline needs this clock too, to tell the
                # serving path's share from the scheduler's (not awaited; misses only).
                self._scheduler.note_client_ttft.remote(request_id, ttft_s)
            detok = Detokenizer(self.tokenizer, sampling.stop)
            if done.finish_reason is None:
                # From here on a cancel goes to the decode worker (even before its hand-off
                # lands there: the worker then drops the late hand-off).
                decode_worker = self._decode_handle(done.decode_worker_id)
                self._in_decode[request_id] = decode_worker
                text = detok.add(done.first_token)
                yield self._output(
                    done, request_id, done.first_token, text, 0, None, started, ttft_s, slo_class
                )
            else:
                # The request ended with its first token; the same rules as the workers' tell
                # whether that token is shown (not EOS, not the end of a stop string).
                checker = StopChecker(
                    sampling, self._eos_ids, len(ids), self._context, self.tokenizer
                )
                checker.add(done.first_token)
                token = done.first_token if checker.token_ids else None
                finished = True
                # Recorded before the yield: a consumer may stop at the final output.
                self._record(done, ttft_s, None, started, done.finish_reason)
                yield self._output(
                    done,
                    request_id,
                    token,
                    detok.finish(checker.text),
                    0,
                    done.finish_reason,
                    started,
                    ttft_s,
                    slo_class,
                )
                return
            tpot_s = None
            index = 0
            async for event in bound.iterate(self._decode_events(decode_worker, request_id)):
                # An abort/error event has no position of its own: it follows the last token.
                index = event.index if event.index >= 0 else index + 1
                if event.token_id is not None:
                    tpot_s = (time.monotonic() - first_at) / index
                out = self._output(
                    done,
                    request_id,
                    event.token_id,
                    event.text,
                    index,
                    event.finish_reason,
                    started,
                    ttft_s,
                    slo_class,
                    tpot_s,
                )
                if event.finish_reason is not None:
                    finished = True
                    self._record(done, ttft_s, tpot_s, started, event.finish_reason)
                yield out
                if finished:
                    return
        except (RequestRejectedError, InvalidRequestError):
            # Not failures of the service: a rejection is counted where it is decided, and a
            # bad request (a duplicate id) is the client's.
            raise
        except RequestTimeoutError:
            self._count_finished(done.slo_class if done else slo_class, "timeout")
            raise
        except Exception:
            # A worker died, the scheduler is restarting, ...: the client sees 500/503.
            self._count_finished(done.slo_class if done else slo_class, "error")
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:  # the consumer went away (client disconnect, aclose)
                self._count_finished(done.slo_class if done else slo_class, "abort")
            raise
        finally:
            self._in_flight.discard(request_id)
            if not finished:
                # The consumer went away (or an error is propagating): free what it held.
                await asyncio.shield(self._cancel_quietly(request_id))
            self._in_decode.pop(request_id, None)

    def _decode_handle(self, decode_id: str):
        """The decode worker ``decode_id`` (the scheduler names it; see ``PrefillDone``): ours
        when this engine created the workers, else looked up by its actor name once."""
        handle = self._decode_handles.get(decode_id)
        if handle is None:
            if self._workers is not None and decode_id in self._workers.decode:
                handle = self._workers.decode[decode_id]
            else:
                handle = ray.get_actor(
                    f"{self.config.name_prefix}-{decode_id}", namespace=self.config.namespace
                )
            self._decode_handles[decode_id] = handle
        return handle

    async def _decode_events(self, decode_worker, request_id: str) -> AsyncIterator[TokenEvent]:
        try:
            async for ref in decode_worker.stream.remote(request_id):
                for event in await ref:
                    yield event
        except RayActorError as error:
            raise RequestFailedError(
                f"decode worker failed while serving {request_id}: {error}"
            ) from error

    def _output(
        self,
        done: PrefillDone | None,
        request_id,
        token_id,
        text,
        index,
        finish,
        started,
        ttft_s,
        slo_class,
        tpot_s=None,
    ) -> TokenOutput:
        return TokenOutput(
            request_id,
            token_id,
            text,
            index,
            finish,
            ttft_s if ttft_s is not None else time.monotonic() - started,
            tpot_s,
            done.queue_s if done else 0.0,
            done.preemptions if done else 0,
            done.slo_class if done else slo_class,
            done.ttft_slo_s if done else 0.0,
            done.requested_slo_class if done else None,
        )

    def _record(
        self, done: PrefillDone, ttft_s: float, tpot_s: float | None, started: float, reason: str
    ) -> None:
        cls = done.slo_class
        self._metrics.observe("flowprefill_time_to_first_token_seconds", ttft_s, slo_class=cls)
        if tpot_s is not None:
            self._metrics.observe(
                "flowprefill_time_per_output_token_seconds", tpot_s, slo_class=cls
            )
        self._metrics.observe(
            "flowprefill_e2e_request_latency_seconds", time.monotonic() - started, slo_class=cls
        )
        self._count_finished(cls, reason)

    def _count_finished(self, slo_class: str, reason: str) -> None:
        self._metrics.inc(
            "flowprefill_requests_finished_total", slo_class=slo_class, finish_reason=reason
        )

    async def generate(self, prompt, sampling=None, slo=None, request_id=None) -> list[TokenOutput]:
        """Run a request to the end and return all its outputs (a convenience for tests)."""
        return [out async for out in self.submit(prompt, sampling, slo, request_id)]

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its stream ends with finish_reason "abort".
        Returns False if the request is unknown or already finished."""
        decode = self._in_decode.get(request_id)
        if decode is not None:
            return await self._call(decode.cancel.remote(request_id))
        return await self._call(self._scheduler.cancel.remote(request_id))

    async def _cancel_quietly(self, request_id: str) -> None:
        try:
            await self.cancel(request_id)
        except Exception:  # the engine may be shutting down; nothing left to free then
            logger.debug("cancel of %s after disconnect failed", request_id, exc_info=True)

    async def timeline(self, last: int | None = 200) -> dict:
        """The scheduler's timeline of the ``last`` most recent requests (None: all it keeps);
        see ``flowprefill_ray.scheduling.timeline`` and ``why_late``."""
        return await self._call(self._scheduler.timeline_export.remote(last))

    async def stats(self) -> dict:
        """Scheduler counters and samples, and each worker's load (seconds, bytes, tokens)."""
        result = {"scheduler": await self._call(self._scheduler.stats.remote())}
        if self._workers is not None:
            kinds = (
                ("prefill_workers", self._workers.prefill),
                ("decode_workers", self._workers.decode),
            )
            for kind, workers in kinds:
                # A dead worker shows up as an error entry rather than failing the whole call.
                answers = await asyncio.gather(
                    *(h.stats.remote() for h in workers.values()), return_exceptions=True
                )
                result[kind] = {
                    wid: {"worker_id": wid, "error": str(a)} if isinstance(a, BaseException) else a
                    for wid, a in zip(workers, answers, strict=True)
                }
            # Where the scheduler's view and the workers' memory differ (see reconcile.py).
            result["disagreements"] = disagreements(result)
        return result

    async def _call(self, ref):
        """Await a scheduler/worker call, turning Ray's wrappers into the runtime's errors."""
        try:
            return await ref
        except RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, RuntimeEngineError):
                raise cause from None
            raise
        except RayActorError as error:
            # The scheduler (or a worker) died or is being restarted by Ray: what it held for
            # this call is gone, the request can be sent again once it is back.
            raise EngineUnavailableError(
                f"a runtime actor is unavailable (it failed or is restarting; retry the "
                f"request): {_first_line(error)}"
            ) from error


def _first_line(error: BaseException) -> str:
    # Ray's actor errors carry pages of context; clients need the gist.
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _validated(config: RuntimeConfig | dict | None) -> RuntimeConfig:
    if config is None:
        return RuntimeConfig()
    if isinstance(config, RuntimeConfig):
        return config
    return RuntimeConfig.model_validate(config)


def max_prompt_tokens(config: RuntimeConfig, context_tokens: int) -> int:
    """The longest prompt the engine accepts: the configured bound, within the context (one
    position is left for the first generated token)."""
    return min(config.requests.max_prompt_tokens or context_tokens - 1, context_tokens - 1)


async def _predictor(config: RuntimeConfig, workers: Workers, max_prompt: int) -> TTFTPredictor:
    if config.predictor_path is not None:
        predictor = TTFTPredictor.load(config.predictor_path)
    else:
        first = next(iter(workers.prefill.values()))
        points = await first.profile.remote(
            config.prefill.profile_lengths(max_prompt), config.prefill.profile_repeats
        )
        predictor = TTFTPredictor.fit(
            points, PredictorConfig(chunk_tokens=config.policy.long_chunk_tokens)
        )
    if predictor.max_tokens < max_prompt:
        # Not an error (a profile is a choice), but the urgent-request decisions depend on it.
        logger.warning(
            "TTFT predictor profiled up to %d tokens, prompts up to %d are accepted: longer "
            "ones are predicted by extrapolation (%s); list longer prefill.profile_tokens to "
            "time them",
            predictor.max_tokens,
            max_prompt,
            predictor.extrapolation,
        )
    return predictor
