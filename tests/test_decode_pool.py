"""The decode worker's KV pool: ``decode.kv_blocks`` as a number or "auto" (a share of the GPU
memory free after the weights; a documented default on CPU), validated with messages naming the
field, and the engine bounding admission by the smallest pool the workers actually built."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest_ray import runtime_test_config
from pydantic import ValidationError

from flowprefill_ray.errors import InvalidRequestError
from flowprefill_ray.model import ModelConfig
from flowprefill_ray.model.checkpoints import tiny_checkpoint
from flowprefill_ray.runtime.config import DecodeConfig, ModelSource, RuntimeConfig
from flowprefill_ray.runtime.decode_worker import CPU_AUTO_KV_BLOCKS, DecodeWorker, kv_pool_blocks
from flowprefill_ray.runtime.engine import FlowPrefillEngine, decode_pool_tokens
from flowprefill_ray.runtime.model_source import TINY_MODEL_SHAPE
from flowprefill_ray.runtime.placement import Workers
from flowprefill_ray.sampling_params import SamplingParams

GiB = 2**30


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("decode-pool"), **TINY_MODEL_SHAPE)


def test_kv_blocks_takes_a_number_or_auto_and_names_the_field_when_wrong():
    assert DecodeConfig().kv_blocks == 512
    assert DecodeConfig(kv_blocks="auto").kv_blocks == "auto"
    for bad in (0, -3, "lots"):
        with pytest.raises(ValidationError, match=r"decode\.kv_blocks"):
            RuntimeConfig.model_validate({"decode": {"kv_blocks": bad}})
    for bad in (0, 1, 1.5):
        with pytest.raises(ValidationError, match=r"decode\.kv_memory_fraction"):
            RuntimeConfig.model_validate({"decode": {"kv_memory_fraction": bad}})


def test_auto_pool_is_the_configured_share_of_free_gpu_memory_in_whole_blocks(tiny_dir):
    config = ModelConfig.from_pretrained(tiny_dir)
    decode = DecodeConfig(kv_blocks="auto", kv_memory_fraction=0.5, block_size=16)
    # K and V, every layer, 16 token slots of kv_heads x head_dim bf16 (2-byte) values.
    per_block = 2 * config.num_hidden_layers * 16 * config.num_key_value_heads * config.head_dim * 2
    free = 3 * GiB + 12345
    assert kv_pool_blocks(config, torch.bfloat16, decode, free) == int(free * 0.5) // per_block
    # fp32 blocks are twice as large: half as many fit.
    assert kv_pool_blocks(config, torch.float32, decode, free) == int(free * 0.5) // (2 * per_block)
    # No GPU: the documented CPU default; an explicit number is taken as it is.
    assert kv_pool_blocks(config, torch.float32, decode, None) == CPU_AUTO_KV_BLOCKS
    fixed = DecodeConfig(kv_blocks=77)
    assert kv_pool_blocks(config, torch.bfloat16, fixed, 80 * GiB) == 77
    with pytest.raises(ValueError, match="decode.kv_blocks 'auto'.*holds no"):
        kv_pool_blocks(config, torch.bfloat16, decode, per_block)  # half a block's worth


def test_decode_worker_on_cpu_builds_the_auto_default_pool(tiny_dir):
    source = ModelSource(path=str(tiny_dir), device="cpu")
    worker = DecodeWorker("d0", source, DecodeConfig(kv_blocks="auto", block_size=8))
    assert worker.cache.num_blocks == CPU_AUTO_KV_BLOCKS and worker.cache.block_size == 8


def test_engine_capacity_is_the_smallest_pool_the_workers_built():
    config = RuntimeConfig.model_validate({"decode": {"kv_blocks": "auto", "block_size": 4}})
    workers = Workers(decode_kv_blocks={"decode-0": 100, "decode-1": 40})
    assert decode_pool_tokens(config, workers) == 160
    # Fakes without workers: the configured number; "auto" cannot be guessed.
    assert decode_pool_tokens(RuntimeConfig(), Workers()) == 512 * 16
    with pytest.raises(ValueError, match="no decode worker reported"):
        decode_pool_tokens(config, Workers())


@pytest.mark.ray
def test_live_engine_with_an_auto_pool_admits_by_the_pool_the_worker_reported(
    ray_local, runtime_cache_dir
):
    # block_size 1: the CPU auto pool holds CPU_AUTO_KV_BLOCKS tokens, less than the context.
    config = runtime_test_config(
        runtime_cache_dir,
        "flowprefill",
        decode={"kv_blocks": "auto", "block_size": 1},
        name_prefix="fp-test-auto-pool",
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def run():
        engine = await FlowPrefillEngine.start(config)
        try:
            info = await engine.decode_workers["decode-0"].info.remote()
            fits = [o async for o in await engine.submit(list(range(3, 100)), greedy)]
            with pytest.raises(InvalidRequestError, match=f"capacity of {CPU_AUTO_KV_BLOCKS}"):
                await engine.submit([(i % 500) + 3 for i in range(CPU_AUTO_KV_BLOCKS)], greedy)
            return engine.decode_capacity_tokens, info, fits
        finally:
            await engine.shutdown()

    capacity, info, fits = asyncio.run(run())
    assert info["kv_blocks"] == CPU_AUTO_KV_BLOCKS and capacity == CPU_AUTO_KV_BLOCKS
    assert fits[-1].finish_reason == "length"
