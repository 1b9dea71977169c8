"""The fp32 CPU matmuls through oneDNN on packed weights (model/cpu_matmul.py): the default,
computing what F.linear computes, on every tiny architecture (Qwen2's qkv bias too);
``torch`` keeps the dense weights; a wrong choice is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pydantic
import pytest
import torch
from model_checkpoints import TINY_MODELS, tiny_model_dir

from flowprefill_ray.model import load_model
from flowprefill_ray.model.cpu_matmul import (
    _CACHE_VARIABLES,
    ONEDNN_CACHE_ENTRIES,
    linear,
    onednn_linear_available,
    use_onednn,
)
from flowprefill_ray.model.generate import generate
from flowprefill_ray.model.sampling import SamplingParams
from flowprefill_ray.runtime.config import ModelSource

# fp32: only the summation order differs between oneDNN's kernel and MKL's.
ATOL, RTOL = 2e-5, 1e-5


def test_this_torch_runs_the_packed_path():
    # Without it every other test here would compare F.linear with itself.
    assert onednn_linear_available()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_packed_and_dense_models_prefill_and_decode_alike(tmp_path_factory, name):
    path = tiny_model_dir(tmp_path_factory, name)
    packed, dense = load_model(path, cpu_matmul="onednn"), load_model(path)
    assert (packed.matmul, dense.matmul) == ("onednn", "torch")
    assert packed.weights.layers[0].gate_up.is_mkldnn
    assert not dense.weights.layers[0].gate_up.is_mkldnn
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (1, 29, 70)]
    states = packed.start_prefill(prompts), dense.start_prefill(prompts)
    assert all(state.run(lambda: False) for state in states)
    got, expected = (state.result() for state in states)
    torch.testing.assert_close(got.last_logits, expected.last_logits, atol=ATOL, rtol=RTOL)
    for kv_got, kv_expected in zip(got.kv, expected.kv, strict=True):
        torch.testing.assert_close(kv_got.k, kv_expected.k, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(kv_got.v, kv_expected.v, atol=ATOL, rtol=RTOL)
    # Decode steps (one row per sequence) run the same packed matmuls.
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert generate(packed, prompts[1], params) == generate(dense, prompts[1], params)


def test_packed_linear_takes_any_row_count_and_strided_input():
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(96, 40, generator=generator), torch.randn(96, generator=generator)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    for rows in (1, 7, 32, 300):
        x = torch.randn(40, rows, generator=generator).t()  # a transposed view, not contiguous
        expected = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(linear(x, packed, bias), expected, atol=ATOL, rtol=RTOL)


def test_gpu_and_non_fp32_models_keep_dense_weights():
    assert use_onednn("onednn", torch.device("cpu"), torch.float32)
    assert not use_onednn("torch", torch.device("cpu"), torch.float32)
    assert not use_onednn("onednn", torch.device("cpu"), torch.bfloat16)
    assert not use_onednn("onednn", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="cpu_matmul must be"):
        use_onednn("mkl", torch.device("cpu"), torch.float32)


def test_the_config_refuses_an_unknown_matmul_choice():
    # The default since its caches are capped (cpu_matmul.py); torch stays selectable.
    assert ModelSource().cpu_matmul == "onednn"
    assert ModelSource(cpu_matmul="torch").cpu_matmul == "torch"
    with pytest.raises(pydantic.ValidationError, match="cpu_matmul"):
        ModelSource(cpu_matmul="mkl")


# A fresh process: the caches read their capacity once, at the process's first oneDNN call.
_GROWTH_PROBE = """
import json, os, sys
import torch
torch.set_num_threads(1)
from flowprefill_ray.model import load_model
model = load_model(sys.argv[1], cpu_matmul="onednn")
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
model.prefill(list(range(5, 21)))
before = rss_mib()
for tokens in range(1, 201):  # a serving worker meets a new token count with most batches
    model.prefill(list(range(5, 5 + tokens)))
print(json.dumps({"growth_mib": rss_mib() - before, "caps": [os.environ.get(name) for name in
      ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_packed_matmuls_memory_stays_bounded_over_many_token_counts(tmp_path_factory):
    # Uncapped, this grew by 413 MiB (about 2 MiB per new token count); capped, under 20.
    path = tiny_model_dir(tmp_path_factory, "llama")
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", _GROWTH_PROBE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["caps"] == [str(ONEDNN_CACHE_ENTRIES)] * 2
    assert probe["growth_mib"] < 100, probe
