"""Tiny generated checkpoints shared by the model tests, built once per test process."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowprefill_ray.model.checkpoints import tiny_checkpoint

# name -> tiny_checkpoint arguments. Shapes are small so the whole model suite stays fast.
TINY_MODELS: dict[str, dict] = {
    "llama": dict(architecture="LlamaForCausalLM"),
    "llama3_rope_tied": dict(
        architecture="LlamaForCausalLM",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        seed=1,
    ),
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM", qkv_bias=True, seed=2),
    "mistral": dict(architecture="MistralForCausalLM", num_layers=3, seed=3),
}
_built: dict[str, Path] = {}


def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Directory of tiny checkpoint `name` (see TINY_MODELS), written on first use."""
    if name not in _built:
        _built[name] = tiny_checkpoint(tmp_path_factory.mktemp(name), **TINY_MODELS[name])
    return _built[name]
