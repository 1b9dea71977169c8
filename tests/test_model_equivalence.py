"""Our operator-by-operator forward computes what transformers computes, batched and chunked."""

from __future__ import annotations

import pytest
import torch
from model_checkpoints import TINY_MODELS, tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowprefill_ray.model import KVCache, load_model, load_tokenizer
from flowprefill_ray.model.checkpoints import tiny_checkpoint

# fp32 on CPU: only summation order differs between the two implementations.
ATOL, RTOL = 2e-5, 1e-5


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (37, 5, 90)]


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def model_pair(request, tmp_path_factory):
    path = tiny_model_dir(tmp_path_factory, request.param)
    ours = load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def _hf_forward(theirs, token_ids: list[int]) -> tuple[torch.Tensor, KVCache]:
    with torch.no_grad():
        out = theirs(torch.tensor([token_ids]), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    # HF keeps [batch, Hk, T, D] per layer; ours is [layers, T, Hk, D].
    k = torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])
    v = torch.stack([layer.values[0].transpose(0, 1) for layer in cache.layers])
    return out.logits[0, -1], KVCache(k, v)


def test_last_token_logits_and_kv_match_transformers(model_pair):
    ours, theirs = model_pair
    for prompt in _prompts(ours.config.vocab_size):
        expected_logits, expected_kv = _hf_forward(theirs, prompt)
        result = ours.prefill(prompt)
        assert result.last_logits.shape == (1, ours.config.vocab_size)
        torch.testing.assert_close(result.last_logits[0], expected_logits, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(result.kv[0].k, expected_kv.k, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(result.kv[0].v, expected_kv.v, atol=ATOL, rtol=RTOL)


def test_batched_prefill_equals_each_sequence_alone(model_pair):
    ours, _ = model_pair
    prompts = _prompts(ours.config.vocab_size)
    state = ours.start_prefill(prompts)
    assert state.run(lambda: False)
    batched = state.result()
    assert batched.last_logits.shape == (len(prompts), ours.config.vocab_size)
    for b, prompt in enumerate(prompts):
        alone = ours.prefill(prompt)
        assert batched.kv[b].num_tokens == len(prompt)
        torch.testing.assert_close(
            batched.last_logits[b], alone.last_logits[0], atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(batched.kv[b].k, alone.kv[0].k, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(batched.kv[b].v, alone.kv[0].v, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 89])
def test_chunked_prefill_equals_unchunked(tmp_path_factory, chunk_size):
    ours = load_model(tiny_model_dir(tmp_path_factory, "llama"))
    prompt = _prompts(ours.config.vocab_size)[2]  # 90 tokens: the last chunk is partial
    whole = ours.prefill(prompt)
    chunked = ours.prefill(prompt, chunk_size=chunk_size)
    assert chunked.kv[0].num_tokens == len(prompt)
    torch.testing.assert_close(chunked.last_logits, whole.last_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(chunked.kv[0].k, whole.kv[0].k, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(chunked.kv[0].v, whole.kv[0].v, atol=ATOL, rtol=RTOL)


def test_batch_of_chunks_with_different_prefixes(tmp_path_factory):
    """Second chunks of two prompts, one with a prefix and one without, in one forward."""
    ours = load_model(tiny_model_dir(tmp_path_factory, "qwen2_bias"))
    first, second = _prompts(ours.config.vocab_size)[0], _prompts(ours.config.vocab_size)[1]
    prefix = ours.prefill(first[:20]).kv[0]
    state = ours.start_prefill([first[20:], second], prefixes=[prefix, None])
    state.run(lambda: False)
    result = state.result()
    for b, prompt in enumerate([first, second]):
        alone = ours.prefill(prompt)
        assert result.kv[b].num_tokens == len(prompt)
        torch.testing.assert_close(
            result.last_logits[b], alone.last_logits[0], atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(result.kv[b].k, alone.kv[0].k, atol=ATOL, rtol=RTOL)


def test_tiny_checkpoint_ships_a_chat_tokenizer_both_loaders_read(tmp_path_factory):
    path = tiny_model_dir(tmp_path_factory, "llama")
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    text = "The scheduler pauses the prefill."
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == text
    chat = ours.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"
    config = load_model(path).config
    assert config.eos_token_id == ours.eos_token_id
    assert len(ours) <= config.vocab_size


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = tiny_checkpoint(tmp_path / "a", seed=5)
    b = tiny_checkpoint(tmp_path / "b", seed=5)
    c = tiny_checkpoint(tmp_path / "c", seed=6)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_triton_kernels_in_the_model_match_the_torch_path(tmp_path_factory):
    """The same forward through the Triton kernels (interpreted on CPU) and the torch ones."""
    path = tiny_model_dir(tmp_path_factory, "qwen2_bias")
    prompts = [p[:9] for p in _prompts(512)[:2]]
    results = []
    for backend in ("torch", "triton"):
        state = load_model(path, kernels=backend).start_prefill(prompts)
        state.run(lambda: False)
        results.append(state.result())
    reference, triton = results
    torch.testing.assert_close(triton.last_logits, reference.last_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(triton.kv, reference.kv, strict=True):
        torch.testing.assert_close(a.k, b.k, atol=1e-4, rtol=1e-4)
