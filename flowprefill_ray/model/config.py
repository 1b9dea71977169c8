"""`ModelConfig`: the subset of a Hugging Face `config.json` that the Llama-family forward needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ModelConfigError, UnsupportedArchitectureError

# The three families share one forward: pre-norm decoder, GQA attention with RoPE, SwiGLU MLP.
# Qwen2 only adds biases on q/k/v; Mistral is Llama with (optionally) a sliding window.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class RopeConfig(BaseModel):
    """Rotary embedding parameters. `rope_type` is `default`, `linear` or `llama3`."""

    model_config = ConfigDict(frozen=True)

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    @model_validator(mode="after")
    def _known_type(self) -> RopeConfig:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; expected one of "
                "'default', 'linear', 'llama3'"
            )
        if self.rope_type == "llama3" and self.original_max_position_embeddings is None:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
        return self


class ModelConfig(BaseModel):
    """Shapes and constants of a Llama-family decoder (token counts in tokens, not bytes)."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {self.architecture!r} is not supported; accepted: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        return self

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt + output) a sequence may hold: ``max_position_embeddings``, or the
        sliding window if smaller (sliding-window attention is not implemented, so we stop there).

        A property of the config, not of a loaded model, because the engine and the front end
        need it before (or without) any weights: they read ``config.json`` only."""
        limit = self.max_position_embeddings
        if self.sliding_window is not None:
            limit = min(limit, self.sliding_window)
        return limit

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the parsed `config.json` of a Hugging Face checkpoint."""
        architectures = raw.get("architectures") or []
        if len(architectures) != 1:
            raise UnsupportedArchitectureError(
                f"config.json must name exactly one architecture, got {architectures!r}; "
                f"accepted: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {architecture!r} is not supported; accepted: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act must be 'silu', got {raw['hidden_act']!r}")
        if raw.get("mlp_bias", False):
            raise ModelConfigError("mlp_bias=True is not supported")
        heads = raw.get("num_attention_heads")
        hidden = raw.get("hidden_size")
        head_dim = raw.get("head_dim") or (hidden // heads if hidden and heads else None)
        # Qwen2 configs carry `use_sliding_window`; the window is only active when it is true.
        window = raw.get("sliding_window")
        if architecture == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            window = None
        try:
            return cls(
                architecture=architecture,
                vocab_size=raw.get("vocab_size"),
                hidden_size=hidden,
                intermediate_size=raw.get("intermediate_size"),
                num_hidden_layers=raw.get("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                max_position_embeddings=raw.get("max_position_embeddings"),
                rope=_rope_from_hf(raw),
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                qkv_bias=architecture == "Qwen2ForCausalLM" or raw.get("attention_bias", False),
                sliding_window=window,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
            )
        except ValidationError as exc:
            raise ModelConfigError(f"invalid model config: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `<path>/config.json`."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ModelConfigError(f"no config.json in {Path(path)}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{config_file} is not valid JSON: {exc}") from exc
        return cls.from_hf_dict(raw)


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    """Accept both layouts: transformers 5 (`rope_parameters`) and 4.x (`rope_theta` + `rope_scaling`)."""
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params["rope_theta"] = raw.get("rope_theta", 10000.0)
    # 4.x configs sometimes spell the type `type`.
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    fields = set(RopeConfig.model_fields)
    return RopeConfig(rope_type=rope_type, **{k: v for k, v in params.items() if k in fields})
