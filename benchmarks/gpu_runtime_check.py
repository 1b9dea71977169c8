"""The live runtime for gpu_check: a ~1B random-weight Llama in bf16 served end to end.

Starts a private Ray cluster on this machine (127.0.0.1) and a ``FlowPrefillEngine`` with one
prefill and one decode worker on the GPU, with the GPU defaults of deployments/gpu-cluster.yaml
(``prefill.checkpoint_sync: auto`` = bounded on CUDA, ``decode.kv_blocks: auto``). Then:

1. a long relaxed request alone: its tokens are the reference;
2. the same long request again, and an urgent short one sent while it computes: the urgent
   one must get its first token first, the long one must have been preempted and still give
   the reference's first token (its prefill resumed, not recomputed). Its later tokens are
   compared as well and reported; they are not a pass criterion, since bf16 decode batched
   with other requests may round differently;
3. a burst of concurrent requests of mixed lengths that must all complete.

One GPU: the decode worker asks Ray for no GPU and shares the prefill worker's (Ray 2.60 leaves
the device visible to zero-GPU actors), with a smaller ``kv_memory_fraction`` since both live
on it. With ``kv_transfer: nccl`` the KV goes GPU to GPU by Ray Direct Transport; NCCL refuses
two ranks on one device, so that run needs two GPUs and is reported as skipped on one.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RuntimeModel:
    """The random model served and the requests sent to it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str  # a ModelSource dtype
    kernels: str  # a ModelSource kernels choice
    long_tokens: int  # the prompt that gets preempted
    urgent_tokens: int
    output_tokens: int
    burst: int  # concurrent requests in the burst
    profile_tokens: tuple[int, ...]


# ~1.1B parameters (Llama-3.2-1B's layout with a 32K vocabulary), long prompt of 16K tokens.
GPU_RUNTIME_MODEL = RuntimeModel(
    16, 2048, 32, 8, 8192, 32000, "bfloat16", "triton", 16384, 64, 16, 32,
    (16, 256, 1024, 4096, 16384),
)  # fmt: skip
# The dry run: the runtime tests' tiny model on CPU (a long prompt takes ~1 s there).
DRY_RUNTIME_MODEL = RuntimeModel(
    4, 128, 4, 2, 256, 512, "float32", "torch", 3000, 16, 4, 6, (16, 64, 256, 1024, 3000)
)


def parameters(spec: RuntimeModel) -> int:
    """Weights of the model ``spec`` describes (untied embeddings, no biases)."""
    head_dim = spec.hidden // spec.heads
    attention = 2 * spec.hidden * spec.hidden + 2 * spec.hidden * spec.kv_heads * head_dim
    layer = attention + 3 * spec.hidden * spec.intermediate + 2 * spec.hidden
    return spec.layers * layer + 2 * spec.vocab * spec.hidden + spec.hidden


def runtime_config(spec: RuntimeModel, path: Path, device: torch.device, kv_transfer: str):
    """The engine's RuntimeConfig for this check (validated: a bad key fails here)."""
    from flowprefill_ray.runtime.config import RuntimeConfig

    on_gpu = device.type == "cuda"
    two_gpus = kv_transfer == "nccl"  # one GPU each; NCCL needs two devices
    return RuntimeConfig.model_validate(
        {
            "model": {
                "path": str(path),
                "device": device.type,
                "dtype": spec.dtype,
                "kernels": spec.kernels,
            },
            "placement": {
                "prefill_num_cpus": 1,
                "prefill_num_gpus": 1 if on_gpu else 0,
                "decode_num_cpus": 1,
                "decode_num_gpus": 1 if two_gpus else 0,
                "scheduler_num_cpus": 0.1,
            },
            "prefill": {
                "checkpoint_sync": "auto",
                "profile_tokens": list(spec.profile_tokens),
                "profile_repeats": 1,
            },
            # Sharing one GPU with the prefill worker: leave it most of the memory.
            "decode": {"kv_blocks": "auto", "kv_memory_fraction": 0.85 if two_gpus else 0.3},
            "kv_transfer": {"mode": kv_transfer},
            "requests": {"max_prompt_tokens": spec.long_tokens},
            "name_prefix": f"gpu-check-{kv_transfer}",
        }
    )


def measure_runtime(
    spec: RuntimeModel, device: torch.device, kv_transfer: str = "object_store"
) -> tuple[dict | None, str | None]:
    """(report, None), or (None, why it was skipped). Starts and stops its own Ray cluster."""
    if kv_transfer == "nccl" and (device.type != "cuda" or torch.cuda.device_count() < 2):
        return None, (
            "kv_transfer nccl needs two GPUs: NCCL refuses two ranks on one device, and the "
            f"prefill and decode workers are two ranks ({torch.cuda.device_count()} GPU visible)"
        )
    import ray

    from flowprefill_ray.model.checkpoints import tiny_checkpoint

    if ray.is_initialized():
        return None, "Ray is already initialised in this process; run gpu_check on its own"
    # Ray listens on 127.0.0.1 only (docs/DEPLOY.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        path = tiny_checkpoint(
            Path(tmp) / "runtime_model",
            num_layers=spec.layers,
            hidden=spec.hidden,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            intermediate=spec.intermediate,
            vocab=spec.vocab,
            max_position=2 * spec.long_tokens,
        )
        written_s = time.perf_counter() - began
        config = runtime_config(spec, path, device, kv_transfer)
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        ray.init(
            address="local",
            num_cpus=8,
            num_gpus=gpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            report = asyncio.run(_drive(spec, config))
        finally:
            ray.shutdown()
    report.update(
        kv_transfer=kv_transfer,
        parameters=parameters(spec),
        model=asdict(spec) | {"profile_tokens": list(spec.profile_tokens)},
        checkpoint_write_s=written_s,
    )
    return report, None


async def _drive(spec: RuntimeModel, config) -> dict:
    from flowprefill_ray.runtime.engine import FlowPrefillEngine
    from flowprefill_ray.sampling_params import SamplingParams

    rng = random.Random(0)
    vocab = min(spec.vocab, 500)  # ids the tokenizer never makes are fine, but keep them small

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    greedy = SamplingParams(temperature=0.0, max_tokens=spec.output_tokens, ignore_eos=True)
    began = time.perf_counter()
    engine = await FlowPrefillEngine.start(config)
    start_s = time.perf_counter() - began
    try:
        prefill_info = await engine.prefill_workers["prefill-0"].info.remote()
        decode_info = await engine.decode_workers["decode-0"].info.remote()
        long_prompt = prompt(spec.long_tokens)
        alone = await engine.generate(long_prompt, greedy, 120.0, "long-alone")
        preempted = await _urgent_during_long(
            engine, long_prompt, prompt(spec.urgent_tokens), greedy
        )
        burst = await _burst(
            engine,
            [prompt(rng.randrange(16, spec.long_tokens // 4)) for _ in range(spec.burst)],
            greedy,
        )
        stats = await engine.stats()
    finally:
        await engine.shutdown()
    long, urgent, firsts = preempted
    tokens = [[o.token_id for o in outs if o.token_id is not None] for outs in (alone, long)]
    scheduler = stats["scheduler"]
    report = {
        "engine_start_s": start_s,
        "checkpoint_sync": prefill_info.get("checkpoint_sync"),
        "prefill_device": prefill_info["device"],
        "decode_kv_blocks": decode_info["kv_blocks"],
        "decode_kv_tokens": decode_info["kv_blocks"] * decode_info["block_size"],
        "long_alone_ttft_s": alone[0].ttft_s,
        "long_ttft_s": long[0].ttft_s,
        "long_preemptions": long[0].preemptions,
        "urgent_ttft_s": urgent[0].ttft_s,
        "urgent_first": firsts["urgent"] < firsts["long"],
        "first_token_match": tokens[0][:1] == tokens[1][:1],
        "tokens_match": tokens[0] == tokens[1],
        "preemption_blocking_s": list(scheduler.get("preemption_blocking_s", []))[:20],
        **burst,
    }
    report["ok"] = bool(
        report["long_preemptions"] >= 1
        and report["urgent_first"]
        and report["first_token_match"]
        and report["burst_completed"] == report["burst_requests"]
        and long[-1].finish_reason == "length"
        and urgent[-1].finish_reason == "length"
    )
    return report


async def _urgent_during_long(engine, long_prompt, urgent_prompt, greedy):
    """The long request, and the urgent one as soon as the long one's unit is running."""
    firsts: dict[str, float] = {}

    async def collect(prompt, slo, request_id):
        outputs = []
        async for out in await engine.submit(prompt, greedy, slo=slo, request_id=request_id):
            if not outputs:
                firsts[request_id] = time.monotonic()
            outputs.append(out)
        return outputs

    long_task = asyncio.create_task(collect(long_prompt, 120.0, "long"))
    deadline = time.monotonic() + 60.0
    while True:  # polled: the engine has no event for "unit started" (a few ms a call)
        running = (await engine.stats())["scheduler"]["running_units"]
        if any(unit is not None for unit in running.values()) or long_task.done():
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the long prefill never started")
        await asyncio.sleep(0.002)
    urgent = await collect(urgent_prompt, 2.0, "urgent")
    return await long_task, urgent, firsts


async def _burst(engine, prompts: list[list[int]], greedy) -> dict:
    began = time.perf_counter()
    results = await asyncio.gather(
        *(engine.generate(p, greedy, "text", f"burst-{i}") for i, p in enumerate(prompts)),
        return_exceptions=True,
    )
    wall = time.perf_counter() - began
    done = [
        r for r in results if not isinstance(r, BaseException) and r[-1].finish_reason == "length"
    ]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {
        "burst_requests": len(prompts),
        "burst_completed": len(done),
        "burst_wall_s": wall,
        "burst_prompt_tokens": sum(len(p) for p in prompts),
        "burst_errors": errors[:5],
    }
