"""Load a Hugging Face safetensors checkpoint into fused per-layer weights, checking names and shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import WeightLoadError


@dataclass
class LayerWeights:
    """One decoder layer. q/k/v and gate/up are fused at load time so each is one matmul."""

    input_norm: torch.Tensor  # [E]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, E]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size] (Qwen2) or None
    o_proj: torch.Tensor  # [E, q_size]
    post_norm: torch.Tensor  # [E]
    gate_up: torch.Tensor  # [2 * I, E]
    down: torch.Tensor  # [E, I]


@dataclass
class ModelWeights:
    embed_tokens: torch.Tensor  # [vocab, E]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [E]
    lm_head: torch.Tensor  # [vocab, E]; the embedding itself when tied

    @property
    def nbytes(self) -> int:
        tensors = [self.embed_tokens, self.final_norm]
        if self.lm_head.data_ptr() != self.embed_tokens.data_ptr():
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors += [layer.input_norm, layer.qkv, layer.o_proj, layer.post_norm]
            tensors += [layer.gate_up, layer.down]
            if layer.qkv_bias is not None:
                tensors.append(layer.qkv_bias)
        return sum(t.nbytes for t in tensors)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for every weight the forward reads."""
    e, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, e),
        "model.norm.weight": (e,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, e)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (e,)
        shapes[p + "post_attention_layernorm.weight"] = (e,)
        shapes[p + "self_attn.q_proj.weight"] = (config.q_size, e)
        shapes[p + "self_attn.k_proj.weight"] = (config.kv_size, e)
        shapes[p + "self_attn.v_proj.weight"] = (config.kv_size, e)
        shapes[p + "self_attn.o_proj.weight"] = (e, config.q_size)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (config.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (config.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (config.kv_size,)
        shapes[p + "mlp.gate_proj.weight"] = (i, e)
        shapes[p + "mlp.up_proj.weight"] = (i, e)
        shapes[p + "mlp.down_proj.weight"] = (e, i)
    return shapes


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors file in {path}")
    return files


def read_tensors(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every expected tensor from the checkpoint at `path` (CPU, stored dtype), shape-checked."""
    shapes = expected_shapes(config)
    found: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name in shapes:
                    found[name] = handle.get_tensor(name)
    for name, shape in shapes.items():
        if name not in found:
            raise WeightLoadError(
                f"weight {name!r} (expected shape {list(shape)}) is missing from {path}"
            )
        got = tuple(found[name].shape)
        if got != shape:
            raise WeightLoadError(
                f"weight {name!r} has shape {list(got)}, expected {list(shape)} from config.json"
            )
    # Checkpoints that tie embeddings still sometimes store lm_head; the tie wins, as in HF.
    return found


def load_weights(
    path: str | Path, config: ModelConfig, device: torch.device | str, dtype: torch.dtype
) -> ModelWeights:
    """Read, check, fuse and move the weights of the checkpoint at `path`."""
    raw = read_tensors(Path(path), config)

    def take(name: str) -> torch.Tensor:
        return raw[name].to(device=device, dtype=dtype)

    layers = []
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        attn, mlp = p + "self_attn.", p + "mlp."
        bias = None
        if config.qkv_bias:
            bias = torch.cat([take(attn + f"{x}_proj.bias") for x in "qkv"])
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=torch.cat([take(attn + f"{x}_proj.weight") for x in "qkv"]),
                qkv_bias=bias,
                o_proj=take(attn + "o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]),
                down=take(mlp + "down_proj.weight"),
            )
        )
    embed = take("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else take("lm_head.weight")
    return ModelWeights(
        embed_tokens=embed, layers=layers, final_norm=take("model.norm.weight"), lm_head=lm_head
    )
