"""Decode path on small models: paged KV cache bookkeeping, sampling, batched decode and generate.

The batched-decode checks compare against transformers' own greedy ``generate`` on the same
random-weight tiny Llama, so they test the real forward, not a re-derivation of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from flowprefill_ray.model.config import ModelConfig, RopeConfig
from flowprefill_ray.model.errors import KVCacheFullError
from flowprefill_ray.model.kv import KVCache
from flowprefill_ray.model.paged_kv import PagedKVCache
from flowprefill_ray.model.sampling import SamplingParams, sample, top_p_filter

# ----------------------------------------------------------------------------- paged KV cache


@pytest.fixture
def small_config() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope=RopeConfig(),
    )


def _random_kv(config: ModelConfig, tokens: int, seed: int) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    shape = (config.num_hidden_layers, tokens, config.num_key_value_heads, config.head_dim)
    return KVCache(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))


def test_added_kv_reads_back_exactly_across_block_boundaries(small_config):
    cache = PagedKVCache(small_config, num_blocks=16, block_size=4)
    kvs = {
        name: _random_kv(small_config, n, seed)
        for seed, (name, n) in enumerate([("a", 1), ("b", 4), ("c", 9), ("empty", 0)])
    }
    for name, kv in kvs.items():
        cache.add(name, kv)
    assert cache.used_blocks == 1 + 1 + 3 + 0
    for name, kv in kvs.items():
        back = cache.get_kv(name)
        assert cache.seq_len(name) == kv.num_tokens
        assert torch.equal(back.k, kv.k) and torch.equal(back.v, kv.v)


def test_decode_slots_grow_a_block_only_when_the_last_one_is_full(small_config):
    cache = PagedKVCache(small_config, num_blocks=8, block_size=4)
    cache.add("three", _random_kv(small_config, 3, 0))
    cache.add("four", _random_kv(small_config, 4, 1))
    assert cache.used_blocks == 2
    slots = cache.append_slots(["three", "four"])
    # "three" fills its last slot (offset 3); "four" needs a second block (offset 0).
    assert slots.offsets.tolist() == [3, 0]
    assert slots.seq_lens.tolist() == [4, 5]
    assert cache.used_blocks == 3
    assert slots.block_tables.dtype == torch.int32 and slots.block_tables.shape == (2, 2)
    assert slots.block_ids[1].item() == slots.block_tables[1, 1].item()
    # Writing through the slots lands at the sequence's next position.
    new_k = torch.full((2, 2, 4), 7.0)
    for layer in range(small_config.num_hidden_layers):
        cache.write(layer, slots, new_k, -new_k)
    assert torch.all(cache.get_kv("four").k[:, 4] == 7.0)
    assert torch.all(cache.get_kv("three").v[:, 3] == -7.0)


def test_freeing_returns_every_block_after_many_cycles(small_config):
    cache = PagedKVCache(small_config, num_blocks=10, block_size=4)
    for round_ in range(5):
        ids = [f"r{round_}s{i}" for i in range(3)]
        for i, seq_id in enumerate(ids):
            cache.add(seq_id, _random_kv(small_config, 2 + 3 * i, i))
        for _ in range(6):
            cache.append_slots(ids)
        assert cache.usage > 0
        freed = sum(cache.free(seq_id) for seq_id in ids)
        assert freed == sum(cache.blocks_for(2 + 3 * i + 6) for i in range(3))
        assert cache.used_blocks == 0 and cache.free_blocks == 10 and cache.usage == 0.0
        assert cache.num_sequences == 0


def test_full_cache_raises_with_numbers_and_changes_nothing(small_config):
    cache = PagedKVCache(small_config, num_blocks=3, block_size=4)
    cache.add("a", _random_kv(small_config, 4, 0))
    cache.add("b", _random_kv(small_config, 8, 1))
    assert cache.free_blocks == 0
    with pytest.raises(KVCacheFullError, match=r"needs 1 block.*only 0 of 3 are free"):
        cache.add("c", _random_kv(small_config, 1, 2))
    assert "c" not in cache
    # A decode step that needs new blocks for both sequences is refused as a whole.
    with pytest.raises(KVCacheFullError) as info:
        cache.append_slots(["a", "b"])
    assert info.value.blocks_needed == 2 and info.value.free_blocks == 0
    assert cache.seq_len("a") == 4 and cache.seq_len("b") == 8
    assert cache.free("a") == 1 and cache.can_add(4) and not cache.can_add(5)


def test_paged_cache_rejects_misuse_with_clear_errors(small_config):
    cache = PagedKVCache(small_config, num_blocks=4, block_size=4)
    cache.add("a", _random_kv(small_config, 2, 0))
    with pytest.raises(ValueError, match="already in the KV cache"):
        cache.add("a", _random_kv(small_config, 2, 0))
    wrong = KVCache(torch.zeros(3, 2, 2, 4), torch.zeros(3, 2, 2, 4))
    with pytest.raises(ValueError, match="layers=2"):
        cache.add("b", wrong)
    with pytest.raises(KeyError, match="'nope' is not in the KV cache"):
        cache.free("nope")
    with pytest.raises(ValueError, match="must not repeat"):
        cache.append_slots(["a", "a"])


def test_pool_size_matches_bytes_per_block(small_config):
    cache = PagedKVCache(small_config, num_blocks=5, block_size=8, dtype=torch.float16)
    per_block = PagedKVCache.bytes_per_block(small_config, 8, torch.float16)
    assert cache.nbytes == 5 * per_block == 5 * 2 * 2 * 8 * 2 * 4 * 2


# ------------------------------------------------------------------------------------ sampling


def test_temperature_zero_is_argmax_for_every_row():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    tokens = sample(logits, [0.0] * 6, [0.3, 1.0, 0.5, 1.0, 0.9, 0.1])
    assert torch.equal(tokens, logits.argmax(-1))


def test_seeded_rows_are_reproducible_whatever_else_is_in_the_batch():
    logits = torch.zeros(3, 1000)  # uniform: every draw is pure randomness

    def draws(batch_rows: list[int], seed: int) -> list[int]:
        out = []
        gens = [torch.Generator().manual_seed(seed + r) for r in batch_rows]
        for _ in range(5):
            rows = logits[batch_rows]
            out.append(sample(rows, [1.0] * len(batch_rows), [1.0] * len(batch_rows), gens))
        return torch.stack(out)[:, 0].tolist()

    alone = draws([0], seed=11)
    in_batch = draws([0, 1, 2], seed=11)
    assert alone == in_batch
    assert draws([0], seed=12) != alone


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [1.0], [1.0], [gen])[0]] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    # Temperature 2 flattens: p ~ sqrt(p) renormalised.
    flat = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    flat /= flat.sum()
    counts.zero_()
    for _ in range(3000):
        counts[sample(logits, [2.0], [1.0], [gen])[0]] += 1
    assert torch.allclose(counts / counts.sum(), flat, atol=0.03)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # exact in binary floating point
    expected = torch.tensor([0.0, 2 / 3, 0.0, 1 / 3])
    assert torch.allclose(top_p_filter(probs, 0.75), expected)
    # Just above 0.75 one of the two 0.125 tokens joins the nucleus (ties: either one).
    kept = top_p_filter(probs, 0.76)
    assert (kept > 0).sum() == 3 and kept[1] > 0 and kept[3] > 0
    assert math.isclose(kept.sum().item(), 1.0, rel_tol=1e-6)
    assert top_p_filter(probs, 1.0) is probs
    # A tiny top_p still keeps the most likely token.
    assert top_p_filter(probs, 1e-6).tolist() == [0.0, 1.0, 0.0, 0.0]
    # Batched: each row has its own top_p.
    rows = top_p_filter(torch.stack([probs, probs, probs]), torch.tensor([0.75, 1e-6, 1.0]))
    assert torch.allclose(rows, torch.stack([expected, torch.tensor([0.0, 1.0, 0.0, 0.0]), probs]))


def test_tiny_top_p_samples_the_argmax_even_when_hot():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens = sample(logits, [5.0] * 4, [1e-4] * 4, gens)
    assert torch.equal(tokens, logits.argmax(-1))


def test_sample_rejects_mismatched_batch_sizes():
    with pytest.raises(ValueError, match="2 rows of logits but 1 temperatures"):
        sample(torch.zeros(2, 5), [0.0], [1.0, 1.0])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", float("nan"), "temperature"),
        ("temperature", float("inf"), "temperature"),
        ("temperature", -0.1, "greater than or equal to 0"),
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("top_p", float("nan"), "top_p"),
        ("max_tokens", 0, "greater than or equal to 1"),
        ("stop", [""], "stop strings must not be empty"),
        ("best_of", 2, "Extra inputs are not permitted"),
    ],
)
def test_sampling_params_reject_invalid_values(field, value, message):
    with pytest.raises(ValidationError, match=message) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)


def test_sampling_params_accept_a_single_stop_string_and_seed():
    params = SamplingParams(stop="\n\n", seed=3, temperature=0.0)
    assert params.stop == ["\n\n"] and params.greedy
    a, b = params.make_generator(), params.make_generator()
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert SamplingParams().make_generator() is None


# ------------------------------------------------------------------- batched decode, tiny model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from flowprefill_ray.model.checkpoints import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_decode"), num_layers=2, vocab=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from flowprefill_ray.model import load_model

    return load_model(tiny_dir, kernels="torch")


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate: new token ids and the logits of each step [N, V]."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens, "transformers stopped early (EOS); pick other prompts"
    return tokens, torch.cat(out.logits).float()


PROMPTS = {
    "short": [11, 12, 13, 14, 15],
    "mid": list(range(40, 57)),
    "long": [(7 * i + 3) % 500 + 3 for i in range(33)],
}


def test_batched_decode_of_separately_prefilled_sequences_matches_transformers(tiny_model, hf_tiny):
    """Three prompts of different lengths are prefilled one by one, their KV handed to one
    paged cache, and decoded greedily in one batch; 'long' joins two steps late, as in
    continuous batching. Every token and every step's logits match transformers' generate."""
    steps = 8
    expected = {name: _hf_greedy(hf_tiny, p, steps + 1) for name, p in PROMPTS.items()}
    cache = PagedKVCache(tiny_model.config, num_blocks=32, block_size=4)
    produced: dict[str, list[int]] = {}
    logits_seen: dict[str, list[torch.Tensor]] = {}

    def admit(name: str) -> None:
        result = tiny_model.prefill(PROMPTS[name])
        cache.add(name, result.kv[0])
        produced[name] = [int(result.last_logits[0].argmax())]
        logits_seen[name] = [result.last_logits[0]]

    admit("short")
    admit("mid")
    for step in range(steps + 2):
        if step == 2:
            admit("long")
        running = [n for n in produced if len(produced[n]) < steps + 1]
        if not running:
            break
        logits = tiny_model.decode_step(running, [produced[n][-1] for n in running], cache)
        assert logits.shape == (len(running), tiny_model.config.vocab_size)
        for row, name in enumerate(running):
            produced[name].append(int(logits[row].argmax()))
            logits_seen[name].append(logits[row])

    for name, (hf_tokens, hf_logits) in expected.items():
        assert produced[name] == hf_tokens, name
        torch.testing.assert_close(torch.stack(logits_seen[name]), hf_logits, atol=1e-4, rtol=1e-4)
        assert cache.seq_len(name) == len(PROMPTS[name]) + steps
    for name in list(produced):
        cache.free(name)
    assert cache.used_blocks == 0 and cache.usage == 0.0


def test_decode_with_triton_kernels_matches_torch_backend(tiny_dir, tiny_model):
    """The same decode step through the Triton kernels (interpreter on CPU) gives the same
    logits as the torch reference ops."""
    from flowprefill_ray.model import load_model

    triton_model = load_model(tiny_dir, kernels="triton")
    caches = []
    for model in (tiny_model, triton_model):
        cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
        for name in ("short", "mid"):
            cache.add(name, tiny_model.prefill(PROMPTS[name]).kv[0])
        caches.append((model.decode_step(["short", "mid"], [3, 4], cache), cache))
    (torch_logits, torch_cache), (triton_logits, triton_cache) = caches
    torch.testing.assert_close(triton_logits, torch_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(triton_cache.get_kv("mid").k, torch_cache.get_kv("mid").k)


def test_generate_matches_transformers_greedy_and_honours_max_tokens(tiny_model, hf_tiny):
    from flowprefill_ray.model.generate import FinishReason, generate, generate_output

    prompt = PROMPTS["mid"]
    hf_tokens, _ = _hf_greedy(hf_tiny, prompt, 12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert generate(tiny_model, prompt, params) == hf_tokens
    assert tiny_model.generate(prompt, params) == hf_tokens
    out = generate_output(tiny_model, prompt, params.model_copy(update={"max_tokens": 1}))
    assert out.token_ids == hf_tokens[:1] and out.finish_reason is FinishReason.LENGTH


def test_generate_stops_at_eos_without_emitting_it(tiny_model, hf_tiny):
    import copy

    from flowprefill_ray.model.generate import FinishReason, generate_output

    prompt = PROMPTS["short"]
    hf_tokens, _ = _hf_greedy(hf_tiny, prompt, 6)
    # Declare the 4th greedy token to be EOS: generation must stop right before it.
    model = copy.copy(tiny_model)
    model.config = tiny_model.config.model_copy(update={"eos_token_id": [hf_tokens[3]]})
    out = generate_output(model, prompt, SamplingParams(temperature=0.0, max_tokens=6))
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == hf_tokens[: hf_tokens.index(hf_tokens[3])]


def test_generate_cuts_the_text_at_a_stop_string(tiny_dir, tiny_model):
    from flowprefill_ray.model import load_tokenizer
    from flowprefill_ray.model.generate import FinishReason, generate_output

    tokenizer = load_tokenizer(tiny_dir)
    prompt = tokenizer.encode("The capital of France is")
    free = generate_output(
        tiny_model,
        prompt,
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
        tokenizer,
    )
    assert free.text and len(free.text) > 6
    stop = free.text[4:6]
    first = free.text.find(stop)
    out = generate_output(
        tiny_model,
        prompt,
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]),
        tokenizer,
    )
    assert out.finish_reason is FinishReason.STOP
    assert out.text == free.text[:first]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate_output(tiny_model, prompt, SamplingParams(stop=["x"]))


def test_seeded_generation_is_reproducible(tiny_model):
    from flowprefill_ray.model.generate import generate

    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True)
    first = generate(tiny_model, PROMPTS["short"], params)
    assert generate(tiny_model, PROMPTS["short"], params) == first
    other = generate(tiny_model, PROMPTS["short"], params.model_copy(update={"seed": 8}))
    assert other != first


def test_decode_refuses_to_pass_the_context_length(tmp_path):
    from flowprefill_ray.model import SequenceTooLongError, load_model
    from flowprefill_ray.model.checkpoints import tiny_checkpoint
    from flowprefill_ray.model.generate import FinishReason, generate_output

    model = load_model(tiny_checkpoint(tmp_path, max_position=8), kernels="torch")
    out = generate_output(
        model, [5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    )
    # 5 prompt tokens + 3 new ones fill the 8 positions.
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3
    cache = PagedKVCache(model.config, num_blocks=4, block_size=4)
    cache.add("full", model.prefill(list(range(3, 11))).kv[0])
    with pytest.raises(SequenceTooLongError, match="max_position_embeddings=8"):
        model.decode_step(["full"], [3], cache)


# ------------------------------------------------------------------------- preemption demo


def test_preemption_demo_on_the_tiny_model_reports_a_consistent_timeline(tmp_path, capsys):
    """The short request gets its first token while the long prefill is paused, the long one
    then finishes, and its logits equal an uninterrupted run's."""
    import json

    from flowprefill_ray.demos.preemption import main

    out = tmp_path / "demo.json"
    assert main(["--tiny", "--long-tokens", "1024", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "logits identical to an uninterrupted run: PASS" in printed
    assert r["logits_identical"] and r["logits_max_abs_diff"] == 0.0
    assert r["long_tokens"] == 1024 and r["long_checkpoints"] == 8  # 4 layers x 2 blocks
    assert r["short_finished_before_long"]
    # Moments in order: arrival <= paused <= first token <= resumed <= done.
    moments = [
        r[k]
        for k in (
            "short_arrival_ms",
            "paused_ms",
            "short_first_token_ms",
            "resumed_ms",
            "long_done_ms",
        )
    ]
    assert moments == sorted(moments)
    assert r["blocking_duration_ms"] == pytest.approx(r["paused_ms"] - r["short_arrival_ms"])
    assert r["short_ttft_ms"] == pytest.approx(r["short_first_token_ms"] - r["short_arrival_ms"])
    # Paused inside the forward at a block boundary: the next operator starts a block.
    assert 0 <= r["paused_at_layer"] <= 4
    assert r["paused_before_operator"].split()[-1] in ("input_norm", "post_norm", "final_norm")
    assert r["run_to_completion_ttft_ms"] > r["short_ttft_ms"]


@pytest.mark.parametrize(
    "variant",
    [
        {"architecture": "Qwen2ForCausalLM"},  # q/k/v biases
        {"architecture": "MistralForCausalLM", "tie_word_embeddings": True},
    ],
    ids=["qwen2-bias", "mistral-tied"],
)
def test_generate_matches_transformers_for_other_architectures(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from flowprefill_ray.model import load_model
    from flowprefill_ray.model.checkpoints import tiny_checkpoint
    from flowprefill_ray.model.generate import generate

    path = tiny_checkpoint(tmp_path, num_layers=2, seed=3, **variant)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = PROMPTS["long"]
    hf_tokens, _ = _hf_greedy(hf_model, prompt, 6)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert generate(load_model(path, kernels="torch"), prompt, params) == hf_tokens
