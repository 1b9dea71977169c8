"""Checkpoints for tests and benchmarks: a generated tiny model, and the embedded SmolLM2.

`tiny_checkpoint` writes a random-weight Llama/Mistral/Qwen2 in Hugging Face layout
(config.json, generation_config.json, model.safetensors, a byte-level BPE tokenizer with a
chat template) that both this package and transformers load offline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import SUPPORTED_ARCHITECTURES

# The SmolLM2 conversion lives in gguf.py (decode helper); re-exported here as the one place
# to ask for a checkpoint.
from .gguf import default_checkpoint
from .weights import expected_shapes

__all__ = ["default_checkpoint", "tiny_checkpoint"]

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as SmolLM2 and Qwen2 use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training text for the tiny tokenizer; written for this project.
_TOKENIZER_TEXT = [
    "A prefill reads the whole prompt once and writes the key and value cache of every layer.",
    "Short urgent requests should not wait behind a long relaxed one that started earlier.",
    "The scheduler pauses the running prefill at the next checkpoint and starts the new one.",
    "When the urgent request has its first token, the paused prefill resumes where it stopped.",
    "Each request has a deadline: its arrival time plus its time to first token objective.",
    "Slack is the time left before the deadline minus the predicted remaining work.",
    "The capital of France is Paris. The capital of Italy is Rome. Water boils at 100 degrees.",
    "User: What is the weather like today? Assistant: I cannot see outside, but I can help.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2048 4096 8192.",
    "The quick brown fox jumps over the lazy dog while the decoder streams tokens to the client.",
]


# The generated model the runtime serves as ``model.path: tiny`` (tests, CPU benchmarks): big
# enough that a prefill has many checkpoints, small enough that a CPU test runs in milliseconds.
TINY_MODEL_SHAPE = dict(
    num_layers=4, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512, max_position=16384
)
# The tiny random-weight Llama of docs/ENVIRONMENT: the simulator's CPU profile
# (simulator/profiles/tiny_cpu.json) and the live CPU policy benchmarks use it, so the
# simulator-vs-live comparison prices the very model the live system ran.
ENVIRONMENT_TINY_SHAPE = dict(
    num_layers=4, hidden=256, heads=4, kv_heads=2, intermediate=1024, vocab=512, max_position=32768
)


def cached_tiny_checkpoint(path: str | Path, **shape) -> Path:
    """``tiny_checkpoint(path, **shape)`` unless ``path`` already holds one. Several processes
    may ask at once: each writes beside ``path`` and renames into place, and the losers of the
    race drop their identical copy."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tiny_checkpoint(staging, **shape)
        try:
            staging.rename(path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return path


def tiny_checkpoint(
    path: str | Path,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 512,
    max_position: int = 4096,
    seed: int = 0,
    architecture: str = "LlamaForCausalLM",
    qkv_bias: bool = False,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
) -> Path:
    """Write a deterministic random-weight model to directory `path` and return it.

    `vocab` is the model's vocabulary (>= the tokenizer's ~300 trained tokens; the rest are
    unused rows, as in real checkpoints). `rope_scaling` is a HF dict, e.g. llama3 scaling.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(path, vocab)
    bos = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = _write_config(
        path,
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qkv_bias=qkv_bias,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    from .config import ModelConfig

    model_config = ModelConfig.from_pretrained(path)
    assert model_config.qkv_bias == (qkv_bias or architecture == "Qwen2ForCausalLM"), config
    save_file(
        _random_weights(model_config, seed),
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def _write_config(path: Path, architecture: str, qkv_bias: bool, **fields: Any) -> dict:
    """config.json and generation_config.json via transformers' own config classes, so the
    files have exactly the layout the installed transformers expects."""
    import transformers
    from transformers import GenerationConfig

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    rope_scaling = fields.pop("rope_scaling")
    rope_theta = fields.pop("rope_theta")
    rope: dict[str, Any] = {
        "rope_type": "default",
        **(rope_scaling or {}),
        "rope_theta": rope_theta,
    }
    extra: dict[str, Any] = {"hidden_act": "silu", "rms_norm_eps": 1e-5}
    if architecture == "LlamaForCausalLM":
        extra["attention_bias"] = qkv_bias
    elif qkv_bias and architecture == "MistralForCausalLM":
        raise ValueError("MistralForCausalLM has no q/k/v bias")
    if architecture == "MistralForCausalLM":
        extra["sliding_window"] = None
    config = config_class(architectures=[architecture], rope_parameters=rope, **extra, **fields)
    config.save_pretrained(path)
    GenerationConfig(
        bos_token_id=fields["bos_token_id"],
        eos_token_id=fields["eos_token_id"],
        pad_token_id=fields["pad_token_id"],
    ).save_pretrained(path)
    return config.to_dict()


def _random_weights(config, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled so activations stay O(1) through the layers (1/sqrt(fan_in) matmuls),
    norms near 1; a pure function of `seed` and the shapes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(expected_shapes(config).items()):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            tensor = 0.1 * noise
        elif name == "model.embed_tokens.weight":
            tensor = noise
        else:
            tensor = noise / shape[1] ** 0.5
        tensors[name] = tensor.contiguous()
    return tensors


def _write_tokenizer(path: Path, vocab: int):
    """Train a byte-level BPE on the built-in text and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab < len(alphabet) + len(specials) + 16:
        raise ValueError(
            f"vocab={vocab} is too small for a byte-level tokenizer; need at least "
            f"{len(alphabet) + len(specials) + 16}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 1024),
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_TEXT * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    tokenizer.save_pretrained(str(path))
    return tokenizer
