"""Broken checkpoints and oversized prompts fail with errors that name the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from model_checkpoints import tiny_model_dir
from safetensors.torch import load_file, save_file

from flowprefill_ray.model import (
    ModelConfigError,
    SequenceTooLongError,
    UnsupportedArchitectureError,
    WeightLoadError,
    load_model,
    load_tokenizer,
)


@pytest.fixture
def checkpoint_copy(tmp_path_factory, tmp_path):
    """A private copy of the tiny Llama that a test may break."""
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir(tmp_path_factory, "llama"), copy)
    return copy


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_unknown_architecture_is_named_with_the_accepted_ones(checkpoint_copy):
    _edit_config(checkpoint_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_model(checkpoint_copy)
    message = str(error.value)
    assert "GPT2LMHeadModel" in message
    for accepted in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert accepted in message


def test_missing_weight_is_named(checkpoint_copy):
    _edit_weights(checkpoint_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*missing"):
        load_model(checkpoint_copy)


def test_misshaped_weight_names_tensor_expected_and_actual_shape(checkpoint_copy):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    _edit_weights(checkpoint_copy, shrink)
    with pytest.raises(WeightLoadError) as error:
        load_model(checkpoint_copy)
    message = str(error.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "[16, 64]" in message and "[32, 64]" in message


def test_config_that_disagrees_with_the_weights_names_the_tensor(checkpoint_copy):
    _edit_config(checkpoint_copy, intermediate_size=96)
    with pytest.raises(WeightLoadError, match=r"gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_model(checkpoint_copy)


def test_prompt_longer_than_the_context_reports_both_lengths(tmp_path_factory):
    model = load_model(tiny_model_dir(tmp_path_factory, "llama"))
    limit = model.config.max_position_embeddings
    with pytest.raises(
        SequenceTooLongError, match=rf"{limit + 1} tokens.*max_position_embeddings={limit}"
    ):
        model.start_prefill([[1] * (limit + 1)])
    # A prefix counts toward the context too.
    prefix = model.prefill([1] * 8).kv[0]
    with pytest.raises(SequenceTooLongError, match=rf"{limit + 1} tokens \(8 in its prefix\)"):
        model.start_prefill([[1] * (limit - 7)], prefixes=[prefix])


def test_empty_and_mismatched_inputs_are_rejected(tmp_path_factory):
    model = load_model(tiny_model_dir(tmp_path_factory, "llama"))
    with pytest.raises(ValueError, match="at least one sequence"):
        model.start_prefill([[1, 2], []])
    with pytest.raises(ValueError, match="2 prefixes for 1 sequences"):
        model.start_prefill([[1, 2]], prefixes=[None, None])
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill([1, 2], chunk_size=0)


def test_missing_files_are_reported_by_name(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_safetensors_is_reported(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors file"):
        load_model(checkpoint_copy)


def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path_factory):
    model = load_model(tiny_model_dir(tmp_path_factory, "llama"))
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"\[0, {vocab}\).*\[1, {vocab}\]"):
        model.start_prefill([[1, vocab]])
    with pytest.raises(ValueError, match="token ids must lie"):
        model.start_prefill([[-1, 2]])
