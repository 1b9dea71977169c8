"""``FlowPrefillEngine``: the Python API of the runtime; works without Serve, Serve wraps it.

    engine = await FlowPrefillEngine.start(RuntimeConfig(...))   # on the current Ray cluster
    async for out in engine.submit("Hello", SamplingParams(max_tokens=16), slo="text"):
        print(out.text, end="")
    await engine.shutdown()

Tokenization happens here, on the client side: it is cheap, it keeps the scheduler's event
loop free for decisions, and a bad prompt is refused before it costs the cluster anything.
This file starts the actors, validates each request once before anything is sent
(``RequestLimits.build``, engine_request.py), and answers cancel, stats and shutdown. One request's stream, from submit to its last
token, and the ``RequestStream``/``TokenOutput`` it yields, are in request_stream.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from functools import cached_property

import ray
from ray.exceptions import RayActorError, RayTaskError

from flowprefill_ray.engine_request import EngineRequest, RequestLimits
from flowprefill_ray.engine_request import max_prompt_tokens as prompt_bound
from flowprefill_ray.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    RequestRejectedError,
    RuntimeEngineError,
)
from flowprefill_ray.model import ModelConfig, load_tokenizer
from flowprefill_ray.request_clock import RequestClock
from flowprefill_ray.sampling_params import SamplingParams
from flowprefill_ray.scheduling import TTFTPredictor
from flowprefill_ray.scheduling.predictor import PredictorConfig

from .attachment import EngineAttachment
from .config import RuntimeConfig
from .metrics import RuntimeMetrics
from .model_source import checkpoint_path
from .placement import Workers, create_workers, destroy_workers, niceness_env
from .reconcile import disagreements
from .request_stream import RequestStream, TokenOutput, stream_tokens
from .scheduler import RemoteScheduler

logger = logging.getLogger(__name__)


class FlowPrefillEngine:
    """Client of a running FlowPrefill deployment (scheduler, prefill and decode workers)."""

    def __init__(
        self,
        config: RuntimeConfig,
        scheduler,
        workers: Workers,
        tokenizer,
        model_config,
        owns_actors: bool = True,
    ):
        self.config = config
        # False for a client made by ``attach``: its shutdown leaves the actors to their owner.
        self.owns_actors = owns_actors
        self._scheduler = scheduler
        self._workers = workers
        self.tokenizer = tokenizer
        self.model_config = model_config
        # What one decode worker can ever hold (prompt + output), tokens: the smallest pool,
        # since a request may land on any worker.
        self.decode_capacity_tokens = decode_pool_tokens(config, workers)
        self._in_decode: dict[str, object] = {}  # request id -> decode worker handle
        self._in_flight: set[str] = set()
        self._metrics = RuntimeMetrics()
        # Every class's request counters exist at 0 from start-up (the scheduler's too: they
        # sum across processes), so per-class panels and alerts see classes that never missed,
        # were never rejected or never failed; the preemption counter per prefill worker too.
        self._metrics.zero_init(slo_class=config.slo.class_names, worker_id=list(workers.prefill))
        self._closed = False
        # The lease this client holds on the engine's owner, stamped on every request it
        # submits so that the owner can cancel them all if the lease expires (LeaseKeeper sets
        # it; None for an engine that owns its actors).
        self.client_id: str | None = None

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
                config, workers, max_prompt_tokens(config, model_config.context_limit)
            )
            scheduler = RemoteScheduler.options(
                name=config.scheduler_name,
                namespace=config.namespace,
                num_cpus=config.placement.scheduler_num_cpus,
                runtime_env={"env_vars": niceness_env(config)},
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
    async def attach(cls, attachment: EngineAttachment) -> FlowPrefillEngine:
        """A client of an engine that another process started (``start``) and owns, e.g. one
        per Serve ingress replica. It submits to the owner's scheduler and streams from its
        decode workers like the owner's engine does, with its own in-flight set, decode
        handles and metrics; its ``shutdown`` leaves the actors running (attachment.py)."""
        # Resolved on this node as every worker resolves it ("tiny"/"default" made once here).
        path = checkpoint_path(attachment.config.model)
        model_config = ModelConfig.from_pretrained(path)
        tokenizer = await asyncio.to_thread(load_tokenizer, path)
        return cls(
            attachment.config,
            attachment.scheduler,
            attachment.workers(),
            tokenizer,
            model_config,
            owns_actors=False,
        )

    def attachment(self) -> EngineAttachment:
        """What ``attach`` needs to make another client of this engine's actors."""
        return EngineAttachment(
            self.config,
            self._scheduler,
            dict(self._workers.prefill),
            dict(self._workers.decode),
            dict(self._workers.decode_kv_blocks),
        )

    @property
    def in_flight(self) -> frozenset[str]:
        """Ids of this client's requests that have not ended yet."""
        return frozenset(self._in_flight)

    async def shutdown(self) -> None:
        """Stop accepting requests and remove the actors this engine created (an attached
        client only stops accepting requests: the actors are its owner's)."""
        if self._closed:
            return
        self._closed = True
        if not self.owns_actors:
            return
        try:
            await self._scheduler.close.remote()
        except RayActorError:
            pass
        ray.kill(self._scheduler, no_restart=True)
        await asyncio.to_thread(destroy_workers, self._workers)

    @property
    def prefill_workers(self) -> dict[str, object]:
        return dict(self._workers.prefill)

    @property
    def decode_workers(self) -> dict[str, object]:
        return dict(self._workers.decode)

    # --------------------------------------------------------------------- requests

    @cached_property
    def limits(self) -> RequestLimits:
        """The bounds every request is checked against, once, by ``RequestLimits.build``
        (engine_request.py); the Serve front end validates through the same object."""
        return RequestLimits.of(self.model_config, self.config, self.decode_capacity_tokens)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt accepted, tokens (``limits``)."""
        return self.limits.max_prompt_tokens

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Prompt token ids: a string is encoded with the model's tokenizer (special tokens as
        the tokenizer adds them); a list of ids is taken as it is (``RequestLimits.build``
        checks them against the vocabulary)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def submit(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        slo: str | float | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        cache_salt: str | None = None,
        clock: RequestClock | None = None,
    ) -> RequestStream:
        """Start a request; iterate the result to receive its tokens as they are produced.

        ``async for out in engine.submit(...)`` and ``stream = await engine.submit(...)`` both
        work. ``slo``: an SLO class name, an explicit TTFT target in seconds, or None (the
        default class). ``timeout_s`` bounds the whole request (seconds; None = the configured
        ``requests.request_timeout_s``); past it the request fails with RequestTimeoutError and
        what it held is released. Validation errors are raised by this call itself, before anything
        reaches the cluster. Abandoning the stream (``aclose``, or the consumer's task being
        cancelled) cancels the request. ``cache_salt``: the request shares prefix-cached KV only
        with requests of the same salt (None: with other unsalted ones). ``clock``: where the
        request's TTFT starts and its hop stamps go (the Serve ingress starts it when the HTTP
        request arrives); None starts one now (request_clock.py).

        The request is validated by ``self.limits.build`` and sent as ``submit_request``
        sends an ``EngineRequest`` built elsewhere (the HTTP front end)."""
        if isinstance(slo, str) or slo is None:
            slo_class, ttft_slo_s = slo, None
        elif isinstance(slo, bool) or not isinstance(slo, (int, float)):
            raise InvalidRequestError(
                f"slo must be a class name or a positive TTFT in seconds, got {slo!r}"
            )
        else:
            slo_class, ttft_slo_s = None, slo
        request = self.limits.build(
            self.tokenize(prompt),
            sampling or SamplingParams(),
            slo_class=slo_class,
            ttft_slo_s=ttft_slo_s,
            request_id=request_id,
            timeout_s=timeout_s,
            cache_salt=cache_salt,
        )
        return self.submit_request(request, clock)

    def submit_request(self, request: EngineRequest, clock: RequestClock | None = None):
        """Start a request already validated by ``self.limits.build``; see ``submit``."""
        clock = clock or RequestClock()
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        if len(self._in_flight) >= self.config.requests.max_in_flight:
            # A 429 like the scheduler's admission rejections, so counted with them.
            self._metrics.inc("flowprefill_requests_rejected_total", slo_class=request.slo_class)
            raise RequestRejectedError(request.request_id, "too many requests in flight", 1.0)
        if request.client_id != self.client_id:
            request = replace(request, client_id=self.client_id)
        return RequestStream(request.request_id, stream_tokens(self, request, clock))

    def _decode_handle(self, decode_id: str):
        """The decode worker ``decode_id`` (the scheduler names it; see ``PrefillDone``), one
        of those this engine created and handed to the scheduler."""
        return self._workers.decode[decode_id]

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


def decode_pool_tokens(config: RuntimeConfig, workers: Workers) -> int:
    """Tokens the smallest decode worker's KV pool holds: as the workers sized it (they report
    it when they start), else as configured."""
    blocks = min(workers.decode_kv_blocks.values(), default=None)
    if blocks is None:
        blocks = config.decode.kv_blocks
        if blocks == "auto":
            raise ValueError("decode.kv_blocks is 'auto' but no decode worker reported its pool")
    return blocks * config.decode.block_size


def max_prompt_tokens(config: RuntimeConfig, context_tokens: int) -> int:
    """The longest prompt the engine accepts (engine_request.max_prompt_tokens)."""
    return prompt_bound(config.requests.max_prompt_tokens, context_tokens)


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
