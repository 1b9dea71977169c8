"""``FlowPrefillEngine``: the Python API of the runtime; works without Serve, Serve wraps it.

    engine = await FlowPrefillEngine.start(RuntimeConfig(...))   # on the current Ray cluster
    async for out in engine.submit("Hello", SamplingParams(max_tokens=16), slo="text"):
        print(out.text, end="")
    await engine.shutdown()

Tokenization happens here, on the client side: it is cheap, it keeps the scheduler's event
loop free for decisions, and a bad prompt is refused before it costs the cluster anything.
This file starts the actors, checks each request before anything is sent, and answers cancel, stats and shutdown. One request's stream, from submit to its last
token, and the ``RequestStream``/``TokenOutput`` it yields, are in request_stream.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from types import SimpleNamespace

import ray
from ray.exceptions import RayActorError, RayTaskError

from flowprefill_ray.model import ModelConfig, load_tokenizer
from flowprefill_ray.model.generate import eos_token_ids
from flowprefill_ray.request_clock import RequestClock
from flowprefill_ray.sampling_params import MAX_CACHE_SALT_CHARS, SamplingParams
from flowprefill_ray.scheduling import TTFTPredictor
from flowprefill_ray.scheduling.predictor import PredictorConfig

from .config import RuntimeConfig
from .errors import (
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
    RequestRejectedError,
    RuntimeEngineError,
)
from .metrics import RuntimeMetrics
from .model_source import checkpoint_path
from .placement import Workers, create_workers, destroy_workers, niceness_env
from .reconcile import disagreements
from .request_stream import RequestStream, TokenOutput, stream_tokens
from .scheduler import RemoteScheduler

logger = logging.getLogger(__name__)


class FlowPrefillEngine:
    """Client of a running FlowPrefill deployment (scheduler, prefill and decode workers)."""

    def __init__(self, config: RuntimeConfig, scheduler, workers: Workers, tokenizer, model_config):
        self.config = config
        self._scheduler = scheduler
        self._workers = workers
        self.tokenizer = tokenizer
        self.model_config = model_config
        self._context = model_config.context_limit
        # eos_token_ids reads model.config; the engine holds only the config.
        self._eos_ids = eos_token_ids(SimpleNamespace(config=model_config), tokenizer)
        self.max_prompt_tokens = max_prompt_tokens(config, self._context)
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

    async def shutdown(self) -> None:
        """Stop accepting requests and remove the actors this engine created."""
        if self._closed:
            return
        self._closed = True
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
        if min(len(ids) + sampling.max_tokens, self._context) > self.decode_capacity_tokens:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceed a decode "
                f"worker's KV capacity of {self.decode_capacity_tokens} tokens"
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
        """
        clock = clock or RequestClock()
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        sampling = sampling or SamplingParams()
        ids = self.tokenize(prompt)
        slo_class, ttft_slo_s = self._check(ids, sampling, slo)
        if len(self._in_flight) >= self.config.requests.max_in_flight:
            # A 429 like the scheduler's admission rejections, so counted with them.
            self._metrics.inc("flowprefill_requests_rejected_total", slo_class=slo_class)
            raise RequestRejectedError(request_id or "-", "too many requests in flight", 1.0)
        if cache_salt is not None and not (
            isinstance(cache_salt, str) and 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS
        ):
            raise InvalidRequestError(
                f"cache_salt must be a string of 1 to {MAX_CACHE_SALT_CHARS} characters"
            )
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidRequestError(f"timeout_s must be positive seconds, got {timeout_s!r}")
        timeout_s = timeout_s if timeout_s is not None else self.config.requests.request_timeout_s
        request_id = request_id or uuid.uuid4().hex
        return RequestStream(
            request_id,
            stream_tokens(
                self, request_id, ids, sampling, slo_class, ttft_slo_s, timeout_s, clock, cache_salt
            ),
        )

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
